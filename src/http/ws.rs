//! `GET /api/v1/ws`: the chat protocol over one WebSocket (API.md, WebSocket).
//!
//! Client frames: `send` (same body as POST messages, plus `thread_id`; `document_ids` are
//! checked and retrieved from exactly as there), `subscribe` (`thread_id`,
//! optional `after`), `cancel` (`thread_id`, `turn_id`), `ping`. Server frames are the SSE events
//! as `{"type": <event>, "id": <seq>, ...data}`, plus `pong` and `error` (a request that failed:
//! `{type: "error", code, message, request?}`).
//!
//! Memory stays bounded per socket: outgoing frames pass through a small bounded channel, and
//! subscriptions read the thread's log only when the channel has room, so a slow client slows
//! its own readers and nothing piles up. A client silent for `IDLE_LIMIT` (no frame, no pong to
//! our pings) is disconnected.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chorus_actors::session::events::EventRecord;
use chorus_cluster::{EventStream, turn_events};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;
use warp::Reply;
use warp::filters::ws::{Message as WsMessage, WebSocket, Ws};
use warp::reply::Response;

use super::context::{Ctx, Principal};
use super::error::ApiError;
use super::messages::{attach_documents, reject_unsupported, validate_send};

/// Outgoing frames waiting for a slow client, per socket.
const OUTBOX: usize = 64;
const PING_EVERY: Duration = Duration::from_secs(30);
/// Longest a single frame may take to reach a client before it counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);
const IDLE_LIMIT: Duration = Duration::from_secs(90);
/// Largest client frame accepted.
const MAX_FRAME: usize = 1 << 20;

#[derive(Deserialize)]
struct TokenQuery {
    #[serde(default)]
    access_token: Option<String>,
}

pub async fn upgrade(ctx: Ctx, ws: Ws) -> Result<Response, ApiError> {
    let query: TokenQuery = ctx.query()?;
    let principal = match (&query.access_token, ctx.headers.get("authorization")) {
        (Some(token), None) => ctx.authenticate_token(token)?,
        _ => ctx.authenticate()?,
    };
    Ok(ws
        .max_frame_size(MAX_FRAME)
        .max_message_size(MAX_FRAME)
        .on_upgrade(move |socket| run(socket, ctx, principal))
        .into_response())
}

/// Frames are as strict as the HTTP bodies they mirror: unknown fields are refused.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum ClientFrame {
    Send {
        thread_id: String,
        content: String,
        #[serde(default)]
        model: Option<String>,
        #[serde(default)]
        models: Option<Vec<String>>,
        #[serde(default)]
        temperature: Option<f64>,
        #[serde(default)]
        max_tokens: Option<u32>,
        /// Accepted for parity with POST messages; a socket always streams.
        #[serde(default, rename = "stream")]
        _stream: Option<serde::de::IgnoredAny>,
        #[serde(default)]
        web_search: Option<bool>,
        #[serde(default)]
        document_ids: Option<Vec<String>>,
    },
    Subscribe {
        thread_id: String,
        #[serde(default)]
        after: Option<u64>,
    },
    Cancel {
        thread_id: String,
        turn_id: String,
    },
    Ping,
}

/// `{"type": name, "id": seq, ...data}` without re-parsing the stored JSON.
fn event_frame(event: &EventRecord) -> String {
    let fields = event.data.trim();
    let inner = fields
        .strip_prefix('{')
        .and_then(|f| f.strip_suffix('}'))
        .map(str::trim)
        .unwrap_or("");
    if inner.is_empty() {
        format!("{{\"type\":\"{}\",\"id\":{}}}", event.name, event.seq)
    } else {
        format!(
            "{{\"type\":\"{}\",\"id\":{},{}}}",
            event.name, event.seq, inner
        )
    }
}

fn error_frame(code: &str, message: &str, request: Option<&str>) -> String {
    json!({ "type": "error", "code": code, "message": message, "request": request }).to_string()
}

/// Forwards events from `reader` (only `turn`'s, ending at its `done`, when given).
fn forward(mut events: EventStream, outbox: mpsc::Sender<String>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if outbox.send(event_frame(&event)).await.is_err() {
                return;
            }
        }
    })
}

/// Queues a control frame (replies, errors) without waiting: if the outbox is full the client
/// is not reading, and the writer's deadline will close the socket.
fn control(outbox: &mpsc::Sender<String>, frame: String) {
    let _ = outbox.try_send(frame);
}

struct Socket {
    ctx: Ctx,
    principal: Principal,
    outbox: mpsc::Sender<String>,
    /// One live subscription per thread (a new one replaces it), plus per-turn forwarders.
    tasks: HashMap<String, JoinHandle<()>>,
}

async fn run(socket: WebSocket, ctx: Ctx, principal: Principal) {
    let (mut sink, mut incoming) = socket.split();
    let (outbox, mut outgoing) = mpsc::channel::<String>(OUTBOX);
    let (pings, mut ping_rx) = mpsc::channel::<()>(1);
    let mut writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                frame = outgoing.recv() => match frame {
                    Some(text) => {
                        // A client that stops reading is dropped, not waited for forever.
                        let sent = tokio::time::timeout(WRITE_TIMEOUT, sink.send(WsMessage::text(text)));
                        if !matches!(sent.await, Ok(Ok(()))) {
                            return;
                        }
                    }
                    None => return,
                },
                ping = ping_rx.recv() => {
                    if ping.is_none() {
                        return;
                    }
                    let sent = tokio::time::timeout(WRITE_TIMEOUT, sink.send(WsMessage::ping(Vec::new())));
                    if !matches!(sent.await, Ok(Ok(()))) {
                        return;
                    }
                }
            }
        }
    });
    let mut state = Socket {
        ctx,
        principal,
        outbox,
        tasks: HashMap::new(),
    };
    let mut last_seen = Instant::now();
    let mut ticker = tokio::time::interval(PING_EVERY);
    ticker.tick().await;
    loop {
        tokio::select! {
            frame = incoming.next() => {
                let Some(Ok(frame)) = frame else { break };
                last_seen = Instant::now();
                if frame.is_close() {
                    break;
                }
                if let Ok(text) = frame.to_str() {
                    handle_frame(&mut state, text).await;
                } else if frame.is_binary() {
                    control(&state.outbox, error_frame("VALIDATION_ERROR", "send JSON text frames", None));
                }
            }
            _ = &mut writer => break,
            _ = ticker.tick() => {
                if last_seen.elapsed() > IDLE_LIMIT {
                    tracing::info!("closing an idle WebSocket");
                    break;
                }
                let _ = pings.try_send(());
            }
        }
        state.tasks.retain(|_, task| !task.is_finished());
    }
    for (_, task) in state.tasks.drain() {
        task.abort();
    }
    drop(state);
    drop(pings);
    writer.abort();
}

async fn handle_frame(state: &mut Socket, text: &str) {
    let frame: ClientFrame = match serde_json::from_str(text) {
        Ok(frame) => frame,
        Err(e) => {
            control(
                &state.outbox,
                error_frame("VALIDATION_ERROR", &format!("bad frame: {e}"), None),
            );
            return;
        }
    };
    let (kind, result) = match frame {
        ClientFrame::Ping => {
            control(&state.outbox, json!({ "type": "pong" }).to_string());
            return;
        }
        ClientFrame::Send {
            thread_id,
            content,
            model,
            models,
            temperature,
            max_tokens,
            _stream: _,
            web_search,
            document_ids,
        } => {
            let result = match reject_unsupported(web_search) {
                Ok(()) => {
                    let fields = SendFields {
                        content,
                        model,
                        models,
                        temperature,
                        max_tokens,
                        document_ids,
                    };
                    send(state, thread_id, fields).await
                }
                Err(e) => Err(e),
            };
            ("send", result)
        }
        ClientFrame::Subscribe { thread_id, after } => {
            ("subscribe", subscribe(state, thread_id, after).await)
        }
        ClientFrame::Cancel { thread_id, turn_id } => {
            ("cancel", cancel(state, thread_id, turn_id).await)
        }
    };
    if let Err(error) = result {
        control(
            &state.outbox,
            error_frame(error.code.as_str(), &error.message, Some(kind)),
        );
    }
}

fn thread_uuid(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found("thread"))
}

/// A `send` frame's message fields.
struct SendFields {
    content: String,
    model: Option<String>,
    models: Option<Vec<String>>,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    document_ids: Option<Vec<String>>,
}

async fn send(state: &mut Socket, thread_id: String, fields: SendFields) -> Result<(), ApiError> {
    let thread = thread_uuid(&thread_id)?;
    let mut send = validate_send(
        &state.ctx,
        fields.content,
        fields.model,
        fields.models,
        fields.temperature,
        fields.max_tokens,
    )?;
    attach_documents(&state.ctx, &mut send, fields.document_ids).await?;
    let started = state
        .ctx
        .state
        .homes
        .start_turn(state.principal.user_id, thread, send, false)
        .await
        .map_err(|e| ApiError::from_session(e, "thread"))?;
    // A socket already subscribed to this thread gets the turn's events from that
    // subscription; a second forwarder would send every frame twice.
    let subscribed = state
        .tasks
        .get(&format!("thread:{thread}"))
        .is_some_and(|t| !t.is_finished());
    if !subscribed {
        let task = forward(
            turn_events(started.events, started.turn_id),
            state.outbox.clone(),
        );
        state
            .tasks
            .insert(format!("turn:{}", started.turn_id), task);
    }
    Ok(())
}

async fn subscribe(
    state: &mut Socket,
    thread_id: String,
    after: Option<u64>,
) -> Result<(), ApiError> {
    let thread = thread_uuid(&thread_id)?;
    let subscription = state
        .ctx
        .state
        .homes
        .subscribe(state.principal.user_id, thread, after)
        .await
        .map_err(|e| ApiError::from_session(e, "thread"))?;
    let after = subscription.after;
    let task = forward(subscription.events, state.outbox.clone());
    if let Some(previous) = state.tasks.insert(format!("thread:{thread}"), task) {
        previous.abort();
    }
    control(
        &state.outbox,
        json!({ "type": "subscribed", "thread_id": thread, "after": after }).to_string(),
    );
    Ok(())
}

async fn cancel(state: &mut Socket, thread_id: String, turn_id: String) -> Result<(), ApiError> {
    let thread = thread_uuid(&thread_id)?;
    let turn = Uuid::parse_str(&turn_id).map_err(|_| ApiError::not_found("turn"))?;
    state
        .ctx
        .state
        .homes
        .cancel_turn(state.principal.user_id, thread, turn)
        .await
        .map_err(|e| ApiError::from_session(e, "live turn"))?;
    control(
        &state.outbox,
        json!({ "type": "cancelling", "thread_id": thread, "turn_id": turn }).to_string(),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn event_frames_merge_type_and_id_into_the_data() {
        let event = EventRecord {
            seq: 42,
            turn_id: Uuid::nil(),
            name: "delta",
            data: r#"{"message_id":"m","text":"hi"}"#.into(),
        };
        let frame: Value = serde_json::from_str(&event_frame(&event)).unwrap();
        assert_eq!(
            frame,
            json!({"type": "delta", "id": 42, "message_id": "m", "text": "hi"})
        );
        let empty = EventRecord {
            data: "{}".into(),
            ..event
        };
        let frame: Value = serde_json::from_str(&event_frame(&empty)).unwrap();
        assert_eq!(frame, json!({"type": "delta", "id": 42}));
    }
}
