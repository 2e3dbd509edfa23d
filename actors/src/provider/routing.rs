//! Routing one model call through the pools, with retries and failover before the first token.
//!
//! The order (issue "Provider pools and quotas", ARCHITECTURE.md step 4):
//! 1. a deployment of the model chosen by [`Pools::select`];
//! 2. on a failure before output, the model's next available deployment, at once;
//! 3. when every available deployment failed in this round, the round again after exponential
//!    backoff with jitter (at least the provider's `Retry-After`) while the error is retryable,
//!    up to `routing.max_attempts` tries of the model;
//! 4. then the model's `fallbacks`, each routed the same way; a context-length error goes to the
//!    model's `context_fallbacks` instead, since no deployment of the same model can help;
//! 5. all within `routing.deadline`, after which the last error is returned.
//!
//! A request error (`bad_request`, `unsupported`) is returned at once: it would fail anywhere.
//! "Before output" means before the first text (or the finish of an empty answer): a stream is
//! only handed to the caller once it has produced that, so a deployment that accepts the
//! request and then stalls or errors is failed over like one that refused it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::catalogue::{Catalogue, Model};
use super::pool::{Lease, SelectRequest};
use super::{ChatRequest, Chunk, ChunkStream, Completion, Provider, ProviderError};

/// Longest wait for a deployment's cool-down (a 429's Retry-After, an empty bucket) before
/// the call is failed over or refused instead.
const MAX_COOLDOWN_WAIT: Duration = Duration::from_secs(10);

/// What the caller knows that routing needs.
#[derive(Debug, Clone, Default)]
pub struct RouteOptions {
    /// The deployment the thread used last (prompt-cache affinity).
    pub affinity: Option<String>,
    /// Prompt tokens plus `max_tokens`, reserved from deployments' tokens-per-minute buckets.
    pub estimated_tokens: u64,
    /// Deadline for the first token where the deployment sets none.
    pub first_token_timeout: Duration,
    /// The user's own keys by provider id: their calls use these, outside the shared buckets.
    pub own_keys: HashMap<String, String>,
    /// Deployments not to use for this call (one that cut a stream, when continuing).
    pub exclude: Vec<String>,
}

/// A move to another deployment or model, reported to the client as a `status` event.
#[derive(Debug, Clone)]
pub struct Failover {
    pub from_model: String,
    pub to_model: Option<String>,
    pub from_deployment: String,
    /// The error class that caused it.
    pub reason: &'static str,
}

impl Failover {
    pub fn describe(&self) -> String {
        match &self.to_model {
            Some(to) if *to != self.from_model => format!(
                "{} failed on {} ({}); trying {}",
                self.from_model, self.from_deployment, self.reason, to
            ),
            _ => format!(
                "{} failed on {} ({}); trying another deployment",
                self.from_model, self.from_deployment, self.reason
            ),
        }
    }
}

/// A call that succeeded, with the deployment that served it and the model actually used
/// (a fallback's, when it came to that).
pub struct Routed<T> {
    pub value: T,
    pub lease: Lease,
    pub model: Model,
    /// Whether the user's own key served the call.
    pub own_key: bool,
}

/// Opens a stream that has produced output (or finished empty), failing over as above. The
/// caller records how the stream ends on the lease (`succeeded` or `failed`).
pub async fn open_stream(
    catalogue: &Catalogue,
    model: &Model,
    request: &ChatRequest,
    options: &RouteOptions,
    on_failover: &mut (dyn FnMut(Failover) + Send),
) -> Result<Routed<ChunkStream>, ProviderError> {
    route(
        catalogue,
        model,
        request,
        options,
        on_failover,
        first_output,
    )
    .await
}

/// A whole answer, failing over as above.
pub async fn complete(
    catalogue: &Catalogue,
    model: &Model,
    request: &ChatRequest,
    options: &RouteOptions,
    on_failover: &mut (dyn FnMut(Failover) + Send),
) -> Result<Routed<Completion>, ProviderError> {
    let started = Instant::now();
    let mut routed = route(
        catalogue,
        model,
        request,
        options,
        on_failover,
        |provider, request| async move { provider.complete(request).await },
    )
    .await?;
    routed.lease.succeeded(started.elapsed());
    Ok(routed)
}

/// How trying one model ended without an answer.
enum ModelEnd {
    /// Retries and deployments exhausted (or none available): go to `fallbacks`.
    Exhausted,
    /// The prompt does not fit: go to `context_fallbacks`.
    ContextTooLong,
}

async fn route<T, F, Fut>(
    catalogue: &Catalogue,
    model: &Model,
    request: &ChatRequest,
    options: &RouteOptions,
    on_failover: &mut (dyn FnMut(Failover) + Send),
    mut attempt: F,
) -> Result<Routed<T>, ProviderError>
where
    F: FnMut(Arc<dyn Provider>, ChatRequest) -> Fut,
    Fut: Future<Output = Result<T, ProviderError>>,
{
    let pools = catalogue.pools();
    let policy = &pools.policy;
    let deadline = Instant::now() + policy.deadline;
    let own_key_providers: Vec<String> = options.own_keys.keys().cloned().collect();
    let mut chain: VecDeque<Model> = VecDeque::from([model.clone()]);
    let mut visited: Vec<String> = vec![model.spec.id.clone()];
    let mut last_error: Option<ProviderError> = None;

    while let Some(current) = chain.pop_front() {
        let mut tries = 0u32;
        let mut waited_for_cooldown = 0u32;
        let mut round_failed: Vec<String> = Vec::new();
        let mut last_deployment = String::new();
        let end = loop {
            if tries >= policy.max_attempts || Instant::now() >= deadline {
                break ModelEnd::Exhausted;
            }
            let exclude: Vec<String> = options
                .exclude
                .iter()
                .chain(&round_failed)
                .cloned()
                .collect();
            let select = SelectRequest {
                affinity: options.affinity.as_deref(),
                exclude: &exclude,
                estimated_tokens: options.estimated_tokens,
                own_key_providers: &own_key_providers,
            };
            let Some(mut lease) = pools.select(&current.deployments, &select).await else {
                // Nothing left to try now. Go round again after a backoff only if the last
                // failure may pass with time and the wait fits the deadline.
                let retryable = last_error.as_ref().is_some_and(ProviderError::retryable);
                if round_failed.is_empty() {
                    // Nothing was tried: every deployment is cooling down, out of budget or
                    // broken. A short wait (a Retry-After) is honoured; a long one is an error
                    // that says when to come back.
                    match pools.next_available_in(&current.deployments, &options.exclude) {
                        Some((wait, _))
                            if wait <= MAX_COOLDOWN_WAIT
                                && Instant::now() + wait < deadline
                                && waited_for_cooldown < 2 =>
                        {
                            waited_for_cooldown += 1;
                            tokio::time::sleep(wait + Duration::from_millis(5)).await;
                            continue;
                        }
                        Some((wait, rate_limited)) if last_error.is_none() => {
                            let message = format!(
                                "every deployment of {} is {} for {:.1}s",
                                current.spec.id,
                                if rate_limited {
                                    "rate limited"
                                } else {
                                    "failing (breaker open)"
                                },
                                wait.as_secs_f64()
                            );
                            let wait = Some(wait.max(Duration::from_secs(1)));
                            last_error = Some(if rate_limited {
                                ProviderError::RateLimited {
                                    retry_after: wait,
                                    message,
                                }
                            } else {
                                ProviderError::Overloaded {
                                    retry_after: wait,
                                    message,
                                }
                            });
                        }
                        _ => {}
                    }
                    break ModelEnd::Exhausted;
                }
                if !retryable {
                    break ModelEnd::Exhausted;
                }
                let floor = last_error.as_ref().and_then(ProviderError::retry_after);
                let wait = policy.backoff(tries.saturating_sub(1), floor);
                if Instant::now() + wait >= deadline {
                    break ModelEnd::Exhausted;
                }
                tokio::time::sleep(wait).await;
                round_failed.clear();
                continue;
            };
            tries += 1;
            let deployment = lease.deployment.clone();
            let own_key = options.own_keys.get(&deployment.config.provider_id);
            let provider = match own_key
                .and_then(|key| catalogue.provider_with_key(&deployment, key.clone()))
            {
                Some(provider) => provider,
                None => deployment.provider.clone(),
            };
            let mut call = request.clone();
            call.model.clone_from(&deployment.config.upstream);
            let first_token = deployment
                .config
                .first_token_timeout
                .unwrap_or(options.first_token_timeout)
                .min(deadline.saturating_duration_since(Instant::now()));
            let outcome = match tokio::time::timeout(first_token, attempt(provider, call)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(ProviderError::Timeout {
                    message: format!("no first token within {first_token:?}"),
                }),
            };
            match outcome {
                Ok(value) => {
                    // The caller records the outcome: a stream can still fail after this.
                    return Ok(Routed {
                        value,
                        lease,
                        model: current,
                        own_key: own_key.is_some(),
                    });
                }
                Err(error) => {
                    lease.failed(&error);
                    tracing::warn!(
                        model = %current.spec.id,
                        deployment = %deployment.config.id,
                        class = error.class(),
                        %error,
                        "provider call failed before output"
                    );
                    let class = error.class();
                    let stop = matches!(
                        error,
                        ProviderError::BadRequest { .. } | ProviderError::Unsupported { .. }
                    );
                    let context = matches!(error, ProviderError::ContextTooLong { .. });
                    last_error = Some(error);
                    if stop {
                        break ModelEnd::Exhausted;
                    }
                    if context {
                        break ModelEnd::ContextTooLong;
                    }
                    last_deployment.clone_from(&deployment.config.id);
                    round_failed.push(deployment.config.id.clone());
                    if tries < policy.max_attempts {
                        on_failover(Failover {
                            from_model: current.spec.id.clone(),
                            to_model: None,
                            from_deployment: deployment.config.id.clone(),
                            reason: class,
                        });
                    }
                }
            }
        };
        if matches!(
            last_error,
            Some(ProviderError::BadRequest { .. } | ProviderError::Unsupported { .. })
        ) {
            break;
        }
        let next: Vec<String> = match end {
            ModelEnd::ContextTooLong => {
                // Only a bigger window helps: the context chain replaces what was queued.
                chain.clear();
                current.spec.context_fallbacks.clone()
            }
            ModelEnd::Exhausted => current.spec.fallbacks.clone(),
        };
        let mut added = Vec::new();
        for id in next {
            if visited.contains(&id) {
                continue;
            }
            if let Some(fallback) = catalogue.get(&id) {
                visited.push(id);
                added.push(fallback.clone());
            }
        }
        for fallback in added.into_iter().rev() {
            chain.push_front(fallback);
        }
        if let Some(next) = chain.front() {
            metrics_failover(&current.spec.id, &next.spec.id, last_error.as_ref());
            on_failover(Failover {
                from_model: current.spec.id.clone(),
                to_model: Some(next.spec.id.clone()),
                from_deployment: last_deployment,
                reason: last_error
                    .as_ref()
                    .map_or("unavailable", ProviderError::class),
            });
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    Err(last_error.unwrap_or_else(|| ProviderError::Overloaded {
        retry_after: None,
        message: format!(
            "no deployment of {} is available (breakers open or limits reached)",
            model.spec.id
        ),
    }))
}

/// Hook for failover metrics (wired to the Prometheus registry).
fn metrics_failover(_from: &str, _to: &str, _error: Option<&ProviderError>) {}

/// Starts a stream and waits for its first output, buffering what came before it (usage,
/// a role preamble). An error or an early end before output fails the attempt.
async fn first_output(
    provider: Arc<dyn Provider>,
    request: ChatRequest,
) -> Result<ChunkStream, ProviderError> {
    let mut stream = provider.stream(request).await?;
    let mut buffered = Vec::new();
    loop {
        match stream.next().await {
            None => {
                return Err(ProviderError::Transport {
                    message: "stream ended before any output".into(),
                });
            }
            Some(Err(error)) => return Err(error),
            Some(Ok(chunk)) => {
                let output = match &chunk {
                    Chunk::Text(text) => !text.is_empty(),
                    Chunk::Finish(_) | Chunk::ToolCall(_) => true,
                    Chunk::Usage(_) => false,
                };
                buffered.push(Ok(chunk));
                if output {
                    return Ok(futures_util::stream::iter(buffered).chain(stream).boxed());
                }
            }
        }
    }
}
