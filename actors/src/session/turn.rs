//! `Turn`: one live generation — a user message answered by one or more models.
//!
//! The turn belongs to the session, not to any connection: clients only read its events from
//! the thread's log, so a client hanging up changes nothing here (STYLE.md, habit 7). Each model
//! ("leg") streams concurrently; every leg ends in exactly one settled assistant message —
//! `complete`, `interrupted` (cancelled) or `failed` (with whatever text arrived) — stored
//! *before* its `message_complete` event, and the turn's `done` event comes after every leg is
//! stored, so a client that saw `done` can read the messages back at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use serde_json::json;
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use super::context::count_tokens;
use super::events::ThreadEvents;
use super::user_session::UserSessionMessage;
use crate::provider::catalogue::Model;
use crate::provider::{ChatRequest, Chunk, FinishReason, ProviderError, TokenUsage};
use crate::store::{Message, MessageStatus, Store, Usage};

/// How often a streaming answer's text so far is written to its stored row.
const PARTIAL_FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Deadlines of one provider call.
#[derive(Debug, Clone, Copy)]
pub struct TurnTimeouts {
    /// From sending the request to the first chunk.
    pub first_token: Duration,
    /// Longest silence between two chunks once streaming.
    pub between_chunks: Duration,
}

impl Default for TurnTimeouts {
    fn default() -> Self {
        TurnTimeouts {
            first_token: Duration::from_secs(60),
            between_chunks: Duration::from_secs(60),
        }
    }
}

/// One model's part of a turn.
pub struct TurnLeg {
    pub model: Model,
    /// The assistant message row, already stored with status `streaming`.
    pub message: Message,
    pub request: ChatRequest,
    /// Prompt tokens as counted by context assembly (used when the provider reports none).
    pub estimated_input_tokens: u64,
}

/// How the turn started, for an edge deciding between an SSE stream and an HTTP error.
#[derive(Debug, Clone)]
pub enum FirstOutcome {
    /// At least one model produced output (or finished cleanly with none).
    Started,
    /// Every model failed before any output; the first error.
    AllFailed(ProviderError),
}

pub struct TurnArgs {
    pub turn_id: Uuid,
    pub thread_id: Uuid,
    pub user_message_id: Uuid,
    pub legs: Vec<TurnLeg>,
    pub log: Arc<ThreadEvents>,
    pub store: Arc<dyn Store>,
    /// Flips to true on cancel.
    pub cancel: watch::Receiver<bool>,
    pub session: ActorRef<UserSessionMessage>,
    pub first_outcome: Option<oneshot::Sender<FirstOutcome>>,
    pub timeouts: TurnTimeouts,
    /// The calendar period (`YYYY-MM`) whose usage counters this turn adds to.
    pub usage_period: String,
}

/// What a settled leg reports back to the session.
#[derive(Debug, Clone)]
pub struct LegResult {
    pub message: Message,
    pub error: Option<ProviderError>,
}

pub struct Turn;

#[derive(RactorMessage)]
pub enum TurnMessage {}

impl Actor for Turn {
    type Msg = TurnMessage;
    type State = Option<TurnArgs>;
    type Arguments = TurnArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(Some(args))
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // The whole turn runs here; the actor exists for supervision: if this panics, the
        // session is told (ActorFailed) and settles whatever is still `streaming`.
        if let Some(args) = state.take() {
            run(args).await;
        }
        myself.stop(None);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {}
    }
}

/// Reports the first outcome once: `Started` at the first output of any leg, `AllFailed` when
/// the last leg fails before output.
struct FirstOutcomeGate {
    sender: Option<oneshot::Sender<FirstOutcome>>,
    failed_before_output: usize,
    legs: usize,
}

impl FirstOutcomeGate {
    fn started(&mut self) {
        if let Some(sender) = self.sender.take() {
            let _ = sender.send(FirstOutcome::Started);
        }
    }

    fn failed_before_output(&mut self, error: &ProviderError) {
        self.failed_before_output += 1;
        if self.failed_before_output == self.legs
            && let Some(sender) = self.sender.take()
        {
            let _ = sender.send(FirstOutcome::AllFailed(error.clone()));
        }
    }
}

async fn run(args: TurnArgs) {
    let TurnArgs {
        turn_id,
        thread_id,
        user_message_id,
        legs,
        log,
        store,
        cancel,
        session,
        first_outcome,
        timeouts,
        usage_period,
    } = args;
    let gate = std::sync::Mutex::new(FirstOutcomeGate {
        sender: first_outcome,
        failed_before_output: 0,
        legs: legs.len(),
    });
    let shared = LegContext {
        turn_id,
        thread_id,
        user_message_id,
        log: &log,
        store: &*store,
        timeouts,
        gate: &gate,
    };
    let results = futures_util::future::join_all(
        legs.into_iter()
            .map(|leg| run_leg(&shared, leg, cancel.clone())),
    )
    .await;

    // Usage counters: one chat message per turn, tokens and cost of every leg.
    let (tokens, cost): (i64, f64) = results.iter().fold((0, 0.0), |(t, c), r| {
        (
            t + r.message.usage.input_tokens + r.message.usage.output_tokens,
            c + r.message.cost_usd,
        )
    });
    let user_id = results.first().map(|r| r.message.user_id);
    // A turn every provider refused outright is not a chat message the user is charged for.
    let answered = results
        .iter()
        .any(|r| r.message.status != MessageStatus::Failed || !r.message.content.is_empty());
    if let Some(user_id) = user_id.filter(|_| answered) {
        for (kind, delta) in [
            ("chat_messages", 1),
            ("tokens", tokens),
            ("cost_micro_usd", (cost * 1_000_000.0).round() as i64),
        ] {
            if let Err(e) = store.add_usage(user_id, &usage_period, kind, delta).await {
                tracing::error!(error = %e, kind, "recording usage failed");
            }
        }
    }
    log.append(turn_id, "done", &json!({ "turn_id": turn_id }));
    let _ = session.cast(UserSessionMessage::TurnFinished {
        turn_id,
        thread_id,
        results,
    });
}

struct LegContext<'a> {
    turn_id: Uuid,
    thread_id: Uuid,
    user_message_id: Uuid,
    log: &'a ThreadEvents,
    store: &'a dyn Store,
    timeouts: TurnTimeouts,
    gate: &'a std::sync::Mutex<FirstOutcomeGate>,
}

enum LegEnd {
    Finished(Option<FinishReason>),
    Cancelled,
    Failed(ProviderError),
}

async fn run_leg(
    ctx: &LegContext<'_>,
    leg: TurnLeg,
    mut cancel: watch::Receiver<bool>,
) -> LegResult {
    let TurnLeg {
        model,
        mut message,
        request,
        estimated_input_tokens,
    } = leg;
    let message_id = message.id;
    ctx.log.append(
        ctx.turn_id,
        "message_start",
        &json!({
            "turn_id": ctx.turn_id,
            "thread_id": ctx.thread_id,
            "user_message_id": ctx.user_message_id,
            "message_id": message_id,
            "model": model.spec.id,
        }),
    );
    let started = Instant::now();
    let mut last_flush = started;
    let mut text = String::new();
    let mut usage = TokenUsage::default();
    let mut ttft: Option<Duration> = None;

    let end = 'leg: {
        let opened = tokio::select! {
            biased;
            _ = cancelled(&mut cancel) => break 'leg LegEnd::Cancelled,
            opened = tokio::time::timeout(ctx.timeouts.first_token, model.provider.stream(request)) => opened,
        };
        let mut stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => break 'leg LegEnd::Failed(error),
            Err(_) => {
                break 'leg LegEnd::Failed(ProviderError::Timeout {
                    message: format!("no response within {:?}", ctx.timeouts.first_token),
                });
            }
        };
        let mut finish = None;
        loop {
            let wait = if ttft.is_none() {
                ctx.timeouts.first_token.saturating_sub(started.elapsed())
            } else {
                ctx.timeouts.between_chunks
            };
            let next = tokio::select! {
                biased;
                _ = cancelled(&mut cancel) => break 'leg LegEnd::Cancelled,
                next = tokio::time::timeout(wait, stream.next()) => next,
            };
            match next {
                Err(_) => {
                    break 'leg LegEnd::Failed(ProviderError::Timeout {
                        message: format!("no data from the provider for {wait:?}"),
                    });
                }
                Ok(None) => {
                    if finish.is_none() {
                        break 'leg LegEnd::Failed(ProviderError::Transport {
                            message: "stream ended before completion".into(),
                        });
                    }
                    break 'leg LegEnd::Finished(finish);
                }
                Ok(Some(Err(error))) => break 'leg LegEnd::Failed(error),
                Ok(Some(Ok(chunk))) => match chunk {
                    Chunk::Text(delta) => {
                        if delta.is_empty() {
                            continue;
                        }
                        if ttft.is_none() {
                            ttft = Some(started.elapsed());
                            lock_gate(ctx).started();
                        }
                        ctx.log.append(
                            ctx.turn_id,
                            "delta",
                            &json!({ "message_id": message_id, "text": delta }),
                        );
                        text.push_str(&delta);
                        // Keep the stored row close to what clients saw, so a crash loses at
                        // most about a second of text (the reaper settles what is stored).
                        if last_flush.elapsed() >= PARTIAL_FLUSH_EVERY {
                            last_flush = Instant::now();
                            message.content.clone_from(&text);
                            if let Err(e) = ctx.store.update_message(&message).await {
                                tracing::warn!(error = %e, %message_id, "flushing partial text failed");
                            }
                        }
                    }
                    Chunk::Usage(reported) => {
                        if reported.input_tokens > 0 {
                            usage.input_tokens = reported.input_tokens;
                        }
                        if reported.output_tokens > 0 {
                            usage.output_tokens = reported.output_tokens;
                        }
                    }
                    Chunk::Finish(reason) => finish = Some(reason),
                    Chunk::ToolCall(_) => {}
                },
            }
        }
    };

    // Providers that never reported usage (a cut stream, a cancel) are charged by estimate, so
    // usage is settled for every outcome — except a call refused before any output (an HTTP
    // error, no connection), which the provider does not bill either.
    let refused_before_output = ttft.is_none() && matches!(end, LegEnd::Failed(_));
    if usage.input_tokens == 0 && !refused_before_output {
        usage.input_tokens = estimated_input_tokens;
    }
    if usage.output_tokens == 0 && !text.is_empty() {
        usage.output_tokens = count_tokens(&model, &text) as u64;
    }
    let (status, finish_reason, error) = match end {
        LegEnd::Finished(reason) => (MessageStatus::Complete, reason, None),
        LegEnd::Cancelled => (MessageStatus::Interrupted, None, None),
        LegEnd::Failed(error) => (MessageStatus::Failed, None, Some(error)),
    };
    if ttft.is_none() {
        match &error {
            Some(e) => lock_gate(ctx).failed_before_output(e),
            None => lock_gate(ctx).started(),
        }
    }
    let cost = model.cost_usd(usage.input_tokens, usage.output_tokens);
    let latency_ms = started.elapsed().as_millis() as i64;
    message.content = text;
    message.status = status;
    message.usage = Usage {
        input_tokens: usage.input_tokens as i64,
        output_tokens: usage.output_tokens as i64,
    };
    message.cost_usd = cost;
    message.latency_ms = Some(latency_ms);
    message.ttft_ms = ttft.map(|d| d.as_millis() as i64);
    message.provider = Some(model.provider_id.clone());
    if let Err(e) = ctx.store.update_message(&message).await {
        // The row stays `streaming`; the session's reaper settles it on restart.
        tracing::error!(error = %e, %message_id, "storing the assistant message failed");
    }
    if let Some(error) = &error {
        ctx.log.append(
            ctx.turn_id,
            "error",
            &json!({
                "message_id": message_id,
                "code": error.class(),
                "message": error.to_string(),
                "retryable": error.retryable(),
            }),
        );
    }
    ctx.log.append(
        ctx.turn_id,
        "message_complete",
        &json!({
            "message_id": message_id,
            "status": status,
            "finish_reason": finish_reason,
            "usage": { "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens },
            "cost_usd": cost,
            "latency_ms": latency_ms,
            "ttft_ms": message.ttft_ms,
            "provider": model.provider_id,
        }),
    );
    LegResult { message, error }
}

fn lock_gate<'a>(ctx: &'a LegContext<'_>) -> std::sync::MutexGuard<'a, FirstOutcomeGate> {
    match ctx.gate.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Resolves when the cancel flag turns true (never, if the sender is gone without cancelling).
async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}
