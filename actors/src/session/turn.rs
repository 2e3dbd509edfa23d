//! `Turn`: one live generation — a user message answered by one or more models.
//!
//! The turn belongs to the session, not to any connection: clients only read its events from
//! the thread's log, so a client hanging up changes nothing here (STYLE.md, habit 7). Each model
//! ("leg") streams concurrently; every leg ends in exactly one settled assistant message —
//! `complete`, `interrupted` (cancelled) or `failed` (with whatever text arrived) — stored
//! *before* its `message_complete` event, and the turn's `done` event comes after every leg is
//! stored, so a client that saw `done` can read the messages back at once.

use std::collections::HashMap;
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
use crate::provider::catalogue::{Catalogue, Model};
use crate::provider::routing::{self, Failover, RouteOptions, Routed};
use crate::provider::{
    ChatMessage, ChatRequest, ChatRole, Chunk, FinishReason, ProviderError, TokenUsage,
};
use crate::store::{Message, MessageStatus, Store, Usage};

/// Times a cut answer may continue elsewhere before it ends with an `error` event.
const MAX_CONTINUATIONS: u32 = 2;

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
    /// The deployment that served this model in the thread last (prompt-cache affinity).
    pub affinity: Option<String>,
}

/// How the turn started, for an edge deciding between an SSE stream and an HTTP error.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// Models and the pools that route their calls.
    pub catalogue: Arc<Catalogue>,
    /// The user's own provider keys by provider id (bring-your-own-key).
    pub own_keys: HashMap<String, String>,
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
        catalogue,
        own_keys,
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
        catalogue: &catalogue,
        own_keys: &own_keys,
    };
    let results = futures_util::future::join_all(
        legs.into_iter()
            .map(|leg| run_leg(&shared, leg, cancel.clone())),
    )
    .await;

    // Usage counters (the session counts the same figures in its book).
    let user_id = results.first().map(|r| r.message.user_id);
    if let (Some(user_id), Some(deltas)) = (user_id, super::quota::turn_usage(&results)) {
        for (kind, delta) in deltas {
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
    catalogue: &'a Catalogue,
    own_keys: &'a HashMap<String, String>,
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
        affinity,
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
    // The model and deployment that served the latest part of the answer.
    let mut served: Option<(Model, String, String)> = None;
    let continue_after_cut = model
        .spec
        .continue_after_cut
        .unwrap_or(ctx.catalogue.pools().policy.continue_after_cut);
    let mut options = RouteOptions {
        affinity,
        estimated_tokens: estimated_input_tokens + u64::from(request.max_tokens.unwrap_or(0)),
        first_token_timeout: ctx.timeouts.first_token,
        own_keys: ctx.own_keys.clone(),
        exclude: Vec::new(),
    };
    let mut continuations = 0u32;

    let end = 'leg: loop {
        // A continuation asks the next deployment to go on from the text so far. The prefix is
        // sent without trailing whitespace: Anthropic refuses a final assistant message ending
        // in whitespace (400), and a cut usually falls right after a word's space.
        let mut call = request.clone();
        let prefix = text.trim_end();
        if !prefix.is_empty() {
            call.messages.push(ChatMessage {
                role: ChatRole::Assistant,
                content: prefix.to_owned(),
            });
        }
        let mut on_failover = |failover: Failover| {
            ctx.log.append(
                ctx.turn_id,
                "status",
                &json!({
                    "message_id": message_id,
                    "stage": "failover",
                    "message": failover.describe(),
                    "reason": failover.reason,
                    "from_model": failover.from_model,
                    "to_model": failover.to_model,
                }),
            );
        };
        let opened = tokio::select! {
            biased;
            _ = cancelled(&mut cancel) => break 'leg LegEnd::Cancelled,
            opened = routing::open_stream(ctx.catalogue, &model, &call, &options, &mut on_failover) => opened,
        };
        let Routed {
            value: mut stream,
            mut lease,
            model: used,
            ..
        } = match opened {
            Ok(routed) => routed,
            Err(error) => break 'leg LegEnd::Failed(error),
        };
        served = Some((
            used.clone(),
            lease.provider_id().to_owned(),
            lease.id().to_owned(),
        ));
        let segment_started = Instant::now();
        let call_deadline = lease.deployment.config.timeout.map(|t| segment_started + t);
        let mut segment_usage = TokenUsage::default();
        let mut segment_text = 0usize;
        let mut finish = None;
        let failure = loop {
            let mut wait = ctx.timeouts.between_chunks;
            if let Some(deadline) = call_deadline {
                wait = wait.min(deadline.saturating_duration_since(Instant::now()));
            }
            let next = tokio::select! {
                biased;
                _ = cancelled(&mut cancel) => {
                    settle_segment(&mut usage, segment_usage);
                    lease.settle_tokens(usage_total(segment_usage)).await;
                    break 'leg LegEnd::Cancelled;
                }
                next = tokio::time::timeout(wait, stream.next()) => next,
            };
            match next {
                Err(_) => {
                    break ProviderError::Timeout {
                        message: format!("no data from the provider for {wait:?}"),
                    };
                }
                Ok(None) => match finish.take() {
                    Some(reason) => {
                        lease.succeeded(ttft.unwrap_or_else(|| segment_started.elapsed()));
                        settle_segment(&mut usage, segment_usage);
                        lease.settle_tokens(usage_total(segment_usage)).await;
                        break 'leg LegEnd::Finished(Some(reason));
                    }
                    None => {
                        break ProviderError::Transport {
                            message: "stream ended before completion".into(),
                        };
                    }
                },
                Ok(Some(Err(error))) => break error,
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
                        segment_text += delta.len();
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
                            segment_usage.input_tokens = reported.input_tokens;
                        }
                        if reported.output_tokens > 0 {
                            segment_usage.output_tokens = reported.output_tokens;
                        }
                    }
                    Chunk::Finish(reason) => finish = Some(reason),
                    Chunk::ToolCall(_) => {}
                },
            }
        };
        // The stream failed after output: the deployment is judged, the part is charged.
        lease.failed(&failure);
        if segment_usage.input_tokens == 0 {
            segment_usage.input_tokens = estimated_input_tokens;
        }
        settle_segment(&mut usage, segment_usage);
        lease.settle_tokens(usage_total(segment_usage)).await;
        let _ = segment_text;
        if continue_after_cut && continuations < MAX_CONTINUATIONS && !*cancel.borrow() {
            continuations += 1;
            options.exclude.push(lease.id().to_owned());
            options.affinity = None;
            ctx.log.append(
                ctx.turn_id,
                "status",
                &json!({
                    "message_id": message_id,
                    "stage": "failover",
                    "message": format!(
                        "the answer was cut on {} ({}); continuing elsewhere",
                        lease.id(),
                        failure.class()
                    ),
                    "reason": failure.class(),
                    "from_model": used.spec.id,
                    "to_model": null,
                }),
            );
            tracing::warn!(
                %message_id,
                deployment = %lease.id(),
                class = failure.class(),
                "stream cut after output; continuing on another deployment"
            );
            continue 'leg;
        }
        break 'leg LegEnd::Failed(failure);
    };

    // Providers that never reported usage (a cut stream, a cancel) are charged by estimate, so
    // usage is settled for every outcome — except a call refused before any output (an HTTP
    // error, no connection), which the provider does not bill either.
    let refused_before_output = ttft.is_none() && matches!(end, LegEnd::Failed(_));
    if usage.input_tokens == 0 && !refused_before_output {
        usage.input_tokens = estimated_input_tokens;
    }
    let billed_model = served.as_ref().map_or(&model, |(m, _, _)| m);
    if usage.output_tokens == 0 && !text.is_empty() {
        usage.output_tokens = count_tokens(billed_model, &text) as u64;
    }
    let (status, finish_reason, error) = match end {
        LegEnd::Finished(reason) => (MessageStatus::Complete, reason, None),
        LegEnd::Cancelled => (MessageStatus::Interrupted, None, None),
        LegEnd::Failed(error) => (MessageStatus::Failed, None, Some(error)),
    };
    let cost = billed_model.cost_usd(usage.input_tokens, usage.output_tokens);
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
    let (provider, deployment) = match &served {
        Some((_, provider, deployment)) => (provider.clone(), Some(deployment.clone())),
        None => (model.provider_id.to_string(), None),
    };
    message.provider = Some(provider.clone());
    message.deployment.clone_from(&deployment);
    if let Err(e) = ctx.store.update_message(&message).await {
        // The row stays `streaming`; the session's reaper settles it on restart.
        tracing::error!(error = %e, %message_id, "storing the assistant message failed");
    }
    // Told after the message is stored: an edge answering 502 on this may be read back at once.
    if ttft.is_none() {
        match &error {
            Some(e) => lock_gate(ctx).failed_before_output(e),
            None => lock_gate(ctx).started(),
        }
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
            "provider": provider,
            "deployment": deployment,
            "model_used": billed_model.spec.id,
        }),
    );
    LegResult { message, error }
}

/// Adds one part's usage (a continuation after a cut is a second part) to the answer's.
fn settle_segment(total: &mut TokenUsage, part: TokenUsage) {
    total.input_tokens += part.input_tokens;
    total.output_tokens += part.output_tokens;
}

fn usage_total(usage: TokenUsage) -> u64 {
    usage.input_tokens + usage.output_tokens
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
