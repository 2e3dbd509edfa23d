//! Provider pools: every model's deployments, their live health, and the choice of one per call.
//!
//! A *deployment* is one way to reach a model: a provider endpoint, a key and the upstream model
//! name (`[[models.deployments]]` in models.toml). Its live state — calls in flight, a latency
//! EWMA, a sliding window of outcomes, the circuit breaker, a 429 cool-down and the time its
//! rate buckets refill — lives in [`Deployment`], grouped per provider in a [`PoolState`] owned by
//! that provider's `ProviderPool` actor ([`actor`]).
//!
//! Selection runs on every model call, so it takes one short `std::sync::Mutex` per candidate and
//! never waits on a mailbox or the network: outcomes are written back by the call's [`Lease`]
//! under the same short lock, and the actor only ticks breakers (open → half-open after the
//! cool-down, so the admin view is current without traffic) and exports gauges.
//!
//! The choice (ARCHITECTURE.md, "A chat turn", step 4): among *available* deployments (breaker
//! closed or a half-open probe slot free, not cooling down after a 429, buckets not known empty)
//! of the best priority, keep the thread's last deployment when it is one of them (prompt-cache
//! affinity), else power of two choices by weighted load: `(in_flight + 1) × latency / weight`.

pub mod actor;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Serialize;

use super::{Provider, ProviderError};
use crate::metrics::metrics;
use crate::quota::{BucketSpec, TokenBuckets};
use prometheus::IntCounter;

/// Retries, failover and breaker settings (`[routing]` in chorus.toml).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingPolicy {
    /// Tries of one model (across its deployments) before moving to its fallbacks.
    pub max_attempts: u32,
    /// Longest time spent trying before the first token.
    pub deadline: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Default for models that do not say: a stream cut after output continues elsewhere.
    pub continue_after_cut: bool,
    pub breaker: BreakerPolicy,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BreakerPolicy {
    pub consecutive_failures: u32,
    pub error_rate: f64,
    pub min_requests: u32,
    pub window: Duration,
    pub cooldown: Duration,
    pub probes: u32,
}

impl Default for RoutingPolicy {
    fn default() -> Self {
        RoutingPolicy {
            max_attempts: 4,
            deadline: Duration::from_secs(120),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(4),
            continue_after_cut: true,
            breaker: BreakerPolicy {
                consecutive_failures: 5,
                error_rate: 0.5,
                min_requests: 10,
                window: Duration::from_secs(30),
                cooldown: Duration::from_secs(30),
                probes: 1,
            },
        }
    }
}

impl RoutingPolicy {
    /// Exponential backoff with full jitter for the `n`-th retry (0-based), at least `floor`
    /// (a provider's Retry-After).
    pub fn backoff(&self, n: u32, floor: Option<Duration>) -> Duration {
        let cap = self
            .backoff_base
            .saturating_mul(1u32.checked_shl(n.min(16)).unwrap_or(u32::MAX))
            .min(self.backoff_max);
        let jittered = cap.mul_f64(rand::rng().random_range(0.5..=1.0));
        jittered.max(floor.unwrap_or_default())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// The gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }
}

/// Why a deployment was chosen (recorded in metrics and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectReason {
    // The order indexes `Deployment::selected`.
    /// The only available deployment of the best priority.
    Only,
    /// The thread's previous deployment, still healthy (prompt-cache affinity).
    Affinity,
    /// Power of two choices by weighted load.
    LeastLoad,
    /// A half-open breaker's probe call.
    Probe,
}

impl SelectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SelectReason::Only => "only",
            SelectReason::Affinity => "affinity",
            SelectReason::LeastLoad => "least_load",
            SelectReason::Probe => "probe",
        }
    }
}

/// A deployment as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentConfig {
    /// Unique across the catalogue; recorded on messages.
    pub id: String,
    /// The provider id in models.toml (`openai`, `groq`, …).
    pub provider_id: String,
    pub upstream: String,
    pub weight: u32,
    /// Lower is preferred: deployments of priority 1 are used only when none of priority 0 is
    /// available.
    pub priority: u32,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub first_token_timeout: Option<Duration>,
    pub timeout: Option<Duration>,
}

/// Live state of one deployment.
#[derive(Debug)]
struct Live {
    ewma_latency_ms: f64,
    outcomes: VecDeque<(Instant, bool)>,
    consecutive_failures: u32,
    breaker: BreakerState,
    opened_at: Option<Instant>,
    probes_in_flight: u32,
    cooldown_until: Option<Instant>,
    buckets_empty_until: Option<Instant>,
    last_error: Option<String>,
    calls: u64,
    failures: u64,
}

/// One deployment and its live state.
pub struct Deployment {
    pub config: DeploymentConfig,
    pub provider: Arc<dyn Provider>,
    in_flight: AtomicU32,
    live: Mutex<Live>,
    /// `provider_selections_total` series by [`SelectReason`], resolved once (hot path).
    selected: [Option<IntCounter>; 4],
    /// `provider_calls_total{outcome="success"}`, resolved once.
    succeeded: Option<IntCounter>,
}

/// Latency assumed before a deployment's first success: optimistic, so a new (or restarted)
/// deployment is tried and then judged by what it really does. A pessimistic start would starve
/// it next to fast peers: only successes update the estimate.
const INITIAL_LATENCY_MS: f64 = 1.0;
/// Weight of the newest sample in the latency EWMA.
const EWMA_ALPHA: f64 = 0.2;

impl Deployment {
    pub fn new(config: DeploymentConfig, provider: Arc<dyn Provider>) -> Self {
        let labels = |reason: SelectReason| {
            metrics().provider_selections_total.child([
                &config.provider_id,
                &config.id,
                reason.as_str(),
            ])
        };
        let selected = [
            labels(SelectReason::Only),
            labels(SelectReason::Affinity),
            labels(SelectReason::LeastLoad),
            labels(SelectReason::Probe),
        ];
        let succeeded =
            metrics()
                .provider_calls_total
                .child([&config.provider_id, &config.id, "success"]);
        Deployment {
            selected,
            succeeded,
            config,
            provider,
            in_flight: AtomicU32::new(0),
            live: Mutex::new(Live {
                ewma_latency_ms: INITIAL_LATENCY_MS,
                outcomes: VecDeque::new(),
                consecutive_failures: 0,
                breaker: BreakerState::Closed,
                opened_at: None,
                probes_in_flight: 0,
                cooldown_until: None,
                buckets_empty_until: None,
                last_error: None,
                calls: 0,
                failures: 0,
            }),
        }
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        // A panic while holding this lock leaves plain numbers behind: still usable.
        match self.live.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Moves an open breaker to half-open once its cool-down has passed. Returns the state.
    fn refresh(&self, live: &mut Live, policy: &BreakerPolicy, now: Instant) -> BreakerState {
        if live.breaker == BreakerState::Open
            && live
                .opened_at
                .is_some_and(|at| now.duration_since(at) >= policy.cooldown)
        {
            live.breaker = BreakerState::HalfOpen;
            live.probes_in_flight = 0;
            tracing::info!(deployment = %self.config.id, "breaker half-open");
        }
        live.breaker
    }

    /// Whether a call may go here now, and if so whether it is a probe.
    fn available(&self, policy: &BreakerPolicy, now: Instant) -> Option<bool> {
        let mut live = self.live();
        if live.cooldown_until.is_some_and(|t| now < t)
            || live.buckets_empty_until.is_some_and(|t| now < t)
        {
            return None;
        }
        match self.refresh(&mut live, policy, now) {
            BreakerState::Closed => Some(false),
            BreakerState::Open => None,
            BreakerState::HalfOpen => (live.probes_in_flight < policy.probes).then_some(true),
        }
    }

    fn load_score(&self) -> f64 {
        let latency = self.live().ewma_latency_ms.max(1.0);
        f64::from(self.in_flight() + 1) * latency / f64::from(self.config.weight.max(1))
    }

    /// Records a call's outcome. `failure` is `None` for success.
    fn record(
        &self,
        policy: &BreakerPolicy,
        latency: Duration,
        failure: Option<&ProviderError>,
        probe: bool,
    ) {
        let now = Instant::now();
        let mut live = self.live();
        if probe {
            live.probes_in_flight = live.probes_in_flight.saturating_sub(1);
        }
        live.calls += 1;
        // Outcomes older than the window no longer count, whatever this one is.
        let window_start = now.checked_sub(policy.window).unwrap_or(now);
        while live
            .outcomes
            .front()
            .is_some_and(|(t, _)| *t < window_start)
        {
            live.outcomes.pop_front();
        }
        match failure {
            None => {
                let sample = latency.as_secs_f64() * 1000.0;
                live.ewma_latency_ms =
                    EWMA_ALPHA * sample + (1.0 - EWMA_ALPHA) * live.ewma_latency_ms;
                live.consecutive_failures = 0;
                live.outcomes.push_back((now, true));
                if live.breaker != BreakerState::Closed {
                    tracing::info!(deployment = %self.config.id, "breaker closed");
                }
                live.breaker = BreakerState::Closed;
                live.opened_at = None;
            }
            Some(ProviderError::RateLimited { retry_after, .. }) => {
                // A 429 says "not now", not "broken": cool down without touching the breaker.
                let wait = retry_after.unwrap_or(Duration::from_secs(1));
                live.cooldown_until = Some(now + wait);
                live.last_error = Some("rate limited".into());
            }
            Some(error) if !counts_against_deployment(error) => {}
            Some(error) => {
                live.failures += 1;
                live.consecutive_failures += 1;
                live.outcomes.push_back((now, false));
                live.last_error = Some(error.class().to_owned());
                if let Some(wait) = error.retry_after() {
                    live.cooldown_until = Some(now + wait);
                }
                let total = live.outcomes.len() as u32;
                let failed = live.outcomes.iter().filter(|(_, ok)| !ok).count() as u32;
                let rate_trips = total >= policy.min_requests
                    && f64::from(failed) >= policy.error_rate * f64::from(total);
                let trips = live.breaker == BreakerState::HalfOpen
                    || live.consecutive_failures >= policy.consecutive_failures
                    || rate_trips;
                if trips && live.breaker != BreakerState::Open {
                    tracing::warn!(
                        deployment = %self.config.id,
                        consecutive = live.consecutive_failures,
                        window_failed = failed,
                        window_total = total,
                        "breaker opened"
                    );
                    live.breaker = BreakerState::Open;
                    live.opened_at = Some(now);
                    live.outcomes.clear();
                }
            }
        }
    }

    /// Notes that a rate bucket of this deployment is empty for `wait`.
    fn buckets_empty_for(&self, wait: Duration) {
        self.live().buckets_empty_until = Some(Instant::now() + wait);
    }

    pub fn snapshot(&self, policy: &BreakerPolicy) -> DeploymentSnapshot {
        let now = Instant::now();
        let mut live = self.live();
        let breaker = self.refresh(&mut live, policy, now);
        let window_failed = live.outcomes.iter().filter(|(_, ok)| !ok).count();
        DeploymentSnapshot {
            id: self.config.id.clone(),
            provider: self.config.provider_id.clone(),
            upstream: self.config.upstream.clone(),
            priority: self.config.priority,
            weight: self.config.weight,
            breaker,
            healthy: breaker == BreakerState::Closed
                && live.cooldown_until.is_none_or(|t| now >= t),
            in_flight: self.in_flight(),
            latency_ewma_ms: (live.ewma_latency_ms * 10.0).round() / 10.0,
            consecutive_failures: live.consecutive_failures,
            window_calls: live.outcomes.len(),
            window_failures: window_failed,
            cooldown_remaining_ms: live
                .cooldown_until
                .map(|t| t.saturating_duration_since(now).as_millis() as u64)
                .filter(|ms| *ms > 0),
            calls: live.calls,
            failures: live.failures,
            last_error: live.last_error.clone(),
            rpm: self.config.rpm,
            tpm: self.config.tpm,
            bucket_levels: None,
        }
    }
}

/// Whether an error says something about the deployment's health. A context-length or
/// malformed-request error is about the request, and the same request would fail anywhere.
fn counts_against_deployment(error: &ProviderError) -> bool {
    !matches!(
        error,
        ProviderError::ContextTooLong { .. }
            | ProviderError::BadRequest { .. }
            | ProviderError::Unsupported { .. }
            | ProviderError::RateLimited { .. }
    )
}

/// The admin view of one deployment (`GET /api/v1/admin/providers`).
#[derive(Debug, Clone, Serialize)]
pub struct DeploymentSnapshot {
    pub id: String,
    pub provider: String,
    pub upstream: String,
    pub priority: u32,
    pub weight: u32,
    pub breaker: BreakerState,
    pub healthy: bool,
    pub in_flight: u32,
    pub latency_ewma_ms: f64,
    pub consecutive_failures: u32,
    pub window_calls: usize,
    pub window_failures: usize,
    pub cooldown_remaining_ms: Option<u64>,
    pub calls: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    /// Tokens left in the rpm and tpm buckets (filled in by [`Pools::snapshot`]).
    pub bucket_levels: Option<BucketLevels>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BucketLevels {
    pub requests_remaining: Option<u64>,
    pub tokens_remaining: Option<u64>,
}

/// A provider's deployments (one `ProviderPool` actor owns each).
pub struct PoolState {
    pub provider_id: String,
    pub deployments: Vec<Arc<Deployment>>,
}

/// Every pool of the node, the shared buckets and the policy.
pub struct Pools {
    pools: Vec<Arc<PoolState>>,
    buckets: Option<Arc<dyn TokenBuckets>>,
    pub policy: RoutingPolicy,
}

/// A chosen deployment, held for the duration of one call. Dropping it without an outcome
/// (a cancelled call) frees its slot without judging the deployment.
pub struct Lease {
    pub deployment: Arc<Deployment>,
    pub reason: SelectReason,
    probe: bool,
    started: Instant,
    reserved_tokens: u64,
    settled: bool,
    policy: BreakerPolicy,
    buckets: Option<Arc<dyn TokenBuckets>>,
}

impl Lease {
    pub fn id(&self) -> &str {
        &self.deployment.config.id
    }

    pub fn provider_id(&self) -> &str {
        &self.deployment.config.provider_id
    }

    /// The call succeeded (or produced output): closes a half-open breaker, feeds the latency.
    pub fn succeeded(&mut self, latency: Duration) {
        if !self.settled {
            self.settled = true;
            self.deployment
                .record(&self.policy, latency, None, self.probe);
            if let Some(counter) = &self.deployment.succeeded {
                counter.inc();
            }
        }
    }

    /// The call failed: counts towards the breaker (errors about the request do not).
    pub fn failed(&mut self, error: &ProviderError) {
        if !self.settled {
            self.settled = true;
            let latency = self.started.elapsed();
            self.deployment
                .record(&self.policy, latency, Some(error), self.probe);
            self.count(error.class());
        }
    }

    fn count(&self, outcome: &str) {
        let config = &self.deployment.config;
        metrics()
            .provider_calls_total
            .inc([&config.provider_id, &config.id, outcome]);
    }

    /// Settles the tokens-per-minute reservation with what the call really used.
    pub async fn settle_tokens(&mut self, used: u64) {
        let reserved = std::mem::take(&mut self.reserved_tokens);
        if let (Some(buckets), Some(tpm)) = (&self.buckets, self.deployment.config.tpm) {
            let delta = used as i64 - reserved as i64;
            if delta != 0 {
                buckets
                    .adjust(
                        &bucket_key(&self.deployment.config.id, "tpm"),
                        BucketSpec::per_minute(tpm),
                        delta,
                    )
                    .await;
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.deployment.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.settled && self.probe {
            let mut live = self.deployment.live();
            live.probes_in_flight = live.probes_in_flight.saturating_sub(1);
        }
    }
}

fn bucket_key(deployment: &str, kind: &str) -> String {
    format!("deployment:{deployment}:{kind}")
}

/// What the caller knows about a call when asking for a deployment.
#[derive(Debug, Clone, Default)]
pub struct SelectRequest<'a> {
    /// The deployment this thread used last (prompt-cache affinity).
    pub affinity: Option<&'a str>,
    /// Deployments not to use (already failed for this call).
    pub exclude: &'a [String],
    /// Tokens to reserve from the deployment's tokens-per-minute bucket.
    pub estimated_tokens: u64,
    /// Providers the user has their own key for: calls there leave the shared deployment
    /// buckets alone.
    pub own_key_providers: &'a [String],
}

impl Pools {
    pub fn new(
        pools: Vec<Arc<PoolState>>,
        buckets: Option<Arc<dyn TokenBuckets>>,
        policy: RoutingPolicy,
    ) -> Pools {
        Pools {
            pools,
            buckets,
            policy,
        }
    }

    pub fn pools(&self) -> &[Arc<PoolState>] {
        &self.pools
    }

    pub fn buckets(&self) -> Option<&Arc<dyn TokenBuckets>> {
        self.buckets.as_ref()
    }

    /// Picks one of `candidates` for a call, or `None` when none is available now. Takes the
    /// deployment's rate buckets (unless the user's own key is used); a deployment whose bucket
    /// is empty is skipped until it refills.
    pub async fn select(
        &self,
        candidates: &[Arc<Deployment>],
        request: &SelectRequest<'_>,
    ) -> Option<Lease> {
        let mut skipped: Vec<String> = Vec::new();
        loop {
            let (deployment, probe, reason) = self.choose(candidates, request, &skipped)?;
            let own_key = request
                .own_key_providers
                .contains(&deployment.config.provider_id);
            if !own_key
                && !self
                    .take_buckets(&deployment, request.estimated_tokens)
                    .await
            {
                skipped.push(deployment.config.id.clone());
                continue;
            }
            deployment.in_flight.fetch_add(1, Ordering::Relaxed);
            if let Some(counter) = &deployment.selected[reason as usize] {
                counter.inc();
            }
            if probe {
                deployment.live().probes_in_flight += 1;
            }
            return Some(Lease {
                deployment,
                reason,
                probe,
                started: Instant::now(),
                reserved_tokens: if own_key { 0 } else { request.estimated_tokens },
                settled: false,
                policy: self.policy.breaker.clone(),
                buckets: self.buckets.clone(),
            });
        }
    }

    /// The synchronous part of [`select`](Self::select): no buckets, no awaits.
    pub fn choose(
        &self,
        candidates: &[Arc<Deployment>],
        request: &SelectRequest<'_>,
        skipped: &[String],
    ) -> Option<(Arc<Deployment>, bool, SelectReason)> {
        let now = Instant::now();
        let policy = &self.policy.breaker;
        let mut best_priority = u32::MAX;
        // (deployment, is_probe) of the best priority seen so far.
        let mut top: Vec<(&Arc<Deployment>, bool)> = Vec::new();
        for deployment in candidates {
            let id = deployment.config.id.as_str();
            if request.exclude.iter().chain(skipped).any(|e| e == id) {
                continue;
            }
            if deployment.config.priority > best_priority {
                continue;
            }
            let Some(probe) = deployment.available(policy, now) else {
                continue;
            };
            if deployment.config.priority < best_priority {
                best_priority = deployment.config.priority;
                top.clear();
            }
            top.push((deployment, probe));
        }
        // A half-open deployment gets its probe before the rest of the traffic.
        if let Some((d, _)) = top.iter().find(|(_, probe)| *probe) {
            return Some(((*d).clone(), true, SelectReason::Probe));
        }
        if let Some(affinity) = request.affinity
            && let Some((d, _)) = top.iter().find(|(d, _)| d.config.id == affinity)
            && top.len() > 1
        {
            return Some(((*d).clone(), false, SelectReason::Affinity));
        }
        match top.len() {
            0 => None,
            1 => Some((top[0].0.clone(), false, SelectReason::Only)),
            n => {
                // Two distinct candidates drawn by weight; the less loaded one wins.
                let mut rng = rand::rng();
                let a = weighted_pick(&top, &mut rng, None);
                let b = weighted_pick(&top, &mut rng, Some(a));
                let (a, b) = (top[a].0, top[b.min(n - 1)].0);
                let pick = if b.load_score() < a.load_score() {
                    b
                } else {
                    a
                };
                Some((pick.clone(), false, SelectReason::LeastLoad))
            }
        }
    }

    /// When the soonest of `candidates` becomes available again, if any will without a
    /// success elsewhere (a 429 cool-down, an empty bucket, an open breaker's cool-down), and
    /// whether that wait is a rate limit (429 or bucket) rather than a breaker.
    pub fn next_available_in(
        &self,
        candidates: &[Arc<Deployment>],
        exclude: &[String],
    ) -> Option<(Duration, bool)> {
        let now = Instant::now();
        candidates
            .iter()
            .filter(|d| !exclude.contains(&d.config.id))
            .filter_map(|d| {
                let live = d.live();
                let limited = [live.cooldown_until, live.buckets_empty_until]
                    .into_iter()
                    .flatten()
                    .map(|t| t.saturating_duration_since(now))
                    .max();
                let breaker = match live.breaker {
                    BreakerState::Open => live.opened_at.map(|at| {
                        (at + self.policy.breaker.cooldown).saturating_duration_since(now)
                    }),
                    _ => None,
                };
                match (limited, breaker) {
                    (Some(l), Some(b)) => Some((l.max(b), b <= l)),
                    (Some(l), None) => Some((l, true)),
                    (None, Some(b)) => Some((b, false)),
                    (None, None) => None,
                }
            })
            .min_by_key(|(wait, _)| *wait)
    }

    async fn take_buckets(&self, deployment: &Deployment, estimated_tokens: u64) -> bool {
        let Some(buckets) = &self.buckets else {
            return true;
        };
        let id = &deployment.config.id;
        if let Some(rpm) = deployment.config.rpm {
            let admission = buckets
                .try_take(&bucket_key(id, "rpm"), BucketSpec::per_minute(rpm), 1)
                .await;
            if !admission.allowed {
                deployment.buckets_empty_for(admission.retry_after);
                return false;
            }
        }
        if let Some(tpm) = deployment.config.tpm {
            let spec = BucketSpec::per_minute(tpm);
            // A single call larger than the whole bucket is admitted against a full bucket
            // (it could never pass otherwise) and leaves a debt.
            let amount = estimated_tokens.min(tpm);
            let admission = buckets.try_take(&bucket_key(id, "tpm"), spec, amount).await;
            if !admission.allowed {
                if let Some(rpm) = deployment.config.rpm {
                    buckets
                        .adjust(&bucket_key(id, "rpm"), BucketSpec::per_minute(rpm), -1)
                        .await;
                }
                deployment.buckets_empty_for(admission.retry_after);
                return false;
            }
            if estimated_tokens > amount {
                buckets
                    .adjust(
                        &bucket_key(id, "tpm"),
                        spec,
                        (estimated_tokens - amount) as i64,
                    )
                    .await;
            }
        }
        true
    }

    /// Every deployment's state, with bucket levels, for the admin view.
    pub async fn snapshot(&self) -> Vec<PoolSnapshot> {
        let mut out = Vec::with_capacity(self.pools.len());
        for pool in &self.pools {
            let mut deployments = Vec::with_capacity(pool.deployments.len());
            for deployment in &pool.deployments {
                let mut snap = deployment.snapshot(&self.policy.breaker);
                if let Some(buckets) = &self.buckets
                    && (snap.rpm.is_some() || snap.tpm.is_some())
                {
                    let mut levels = BucketLevels {
                        requests_remaining: None,
                        tokens_remaining: None,
                    };
                    if let Some(rpm) = snap.rpm {
                        levels.requests_remaining = Some(
                            buckets
                                .peek(&bucket_key(&snap.id, "rpm"), BucketSpec::per_minute(rpm))
                                .await
                                .remaining,
                        );
                    }
                    if let Some(tpm) = snap.tpm {
                        levels.tokens_remaining = Some(
                            buckets
                                .peek(&bucket_key(&snap.id, "tpm"), BucketSpec::per_minute(tpm))
                                .await
                                .remaining,
                        );
                    }
                    snap.bucket_levels = Some(levels);
                }
                deployments.push(snap);
            }
            out.push(PoolSnapshot {
                provider: pool.provider_id.clone(),
                deployments,
            });
        }
        out
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PoolSnapshot {
    pub provider: String,
    pub deployments: Vec<DeploymentSnapshot>,
}

/// Index of a candidate drawn with probability proportional to its weight, other than `not`.
fn weighted_pick(
    top: &[(&Arc<Deployment>, bool)],
    rng: &mut impl Rng,
    not: Option<usize>,
) -> usize {
    let weight = |i: usize| {
        if Some(i) == not {
            0
        } else {
            u64::from(top[i].0.config.weight.max(1))
        }
    };
    let total: u64 = (0..top.len()).map(weight).sum();
    if total == 0 {
        return not.map_or(0, |n| (n + 1) % top.len());
    }
    let mut roll = rng.random_range(0..total);
    for i in 0..top.len() {
        let w = weight(i);
        if roll < w {
            return i;
        }
        roll -= w;
    }
    top.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::mock::MockProvider;

    fn deployment(id: &str, priority: u32, weight: u32) -> Arc<Deployment> {
        Arc::new(Deployment::new(
            DeploymentConfig {
                id: id.into(),
                provider_id: "mock".into(),
                upstream: "echo".into(),
                weight,
                priority,
                rpm: None,
                tpm: None,
                first_token_timeout: None,
                timeout: None,
            },
            Arc::new(MockProvider),
        ))
    }

    fn pools(policy: RoutingPolicy) -> Pools {
        Pools::new(Vec::new(), None, policy)
    }

    fn server_error() -> ProviderError {
        ProviderError::Server {
            status: 500,
            message: "boom".into(),
        }
    }

    #[tokio::test]
    async fn best_priority_first_then_the_next_when_excluded() {
        let pools = pools(RoutingPolicy::default());
        let all = vec![deployment("a", 0, 1), deployment("b", 1, 1)];
        let lease = pools.select(&all, &SelectRequest::default()).await.unwrap();
        assert_eq!(lease.id(), "a");
        assert_eq!(lease.reason, SelectReason::Only);
        let exclude = vec!["a".to_owned()];
        let lease = pools
            .select(
                &all,
                &SelectRequest {
                    exclude: &exclude,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(lease.id(), "b");
    }

    #[tokio::test]
    async fn affinity_keeps_a_thread_on_its_deployment_and_load_spreads_the_rest() {
        let pools = pools(RoutingPolicy::default());
        let all = vec![deployment("a", 0, 1), deployment("b", 0, 1)];
        for _ in 0..20 {
            let lease = pools
                .select(
                    &all,
                    &SelectRequest {
                        affinity: Some("b"),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!((lease.id(), lease.reason), ("b", SelectReason::Affinity));
        }
        // Holding leases on `a` makes `b` the less loaded choice every time.
        let mut held = Vec::new();
        for _ in 0..5 {
            let lease = pools
                .select(
                    &all,
                    &SelectRequest {
                        exclude: &["b".to_owned()],
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            held.push(lease);
        }
        for _ in 0..20 {
            let lease = pools.select(&all, &SelectRequest::default()).await.unwrap();
            assert_eq!((lease.id(), lease.reason), ("b", SelectReason::LeastLoad));
        }
        drop(held);
        assert_eq!(all[0].in_flight(), 0);
    }

    #[tokio::test]
    async fn breaker_opens_half_opens_with_one_probe_and_closes_on_success() {
        let mut policy = RoutingPolicy::default();
        policy.breaker.consecutive_failures = 3;
        policy.breaker.cooldown = Duration::from_millis(50);
        let pools = pools(policy);
        let all = vec![deployment("a", 0, 1)];
        for _ in 0..3 {
            let mut lease = pools.select(&all, &SelectRequest::default()).await.unwrap();
            lease.failed(&server_error());
        }
        assert!(
            pools
                .select(&all, &SelectRequest::default())
                .await
                .is_none(),
            "open"
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        let mut probe = pools.select(&all, &SelectRequest::default()).await.unwrap();
        assert_eq!(probe.reason, SelectReason::Probe);
        assert!(
            pools
                .select(&all, &SelectRequest::default())
                .await
                .is_none(),
            "one probe at a time"
        );
        probe.succeeded(Duration::from_millis(5));
        drop(probe);
        let lease = pools.select(&all, &SelectRequest::default()).await.unwrap();
        assert_eq!(lease.reason, SelectReason::Only);
        assert_eq!(
            all[0].snapshot(&pools.policy.breaker).breaker,
            BreakerState::Closed
        );
    }

    #[tokio::test]
    async fn a_failed_probe_reopens_and_429_cools_down_without_opening() {
        let mut policy = RoutingPolicy::default();
        policy.breaker.consecutive_failures = 1;
        policy.breaker.cooldown = Duration::from_millis(30);
        let pools = pools(policy);
        let all = vec![deployment("a", 0, 1)];
        pools
            .select(&all, &SelectRequest::default())
            .await
            .unwrap()
            .failed(&server_error());
        tokio::time::sleep(Duration::from_millis(40)).await;
        let mut probe = pools.select(&all, &SelectRequest::default()).await.unwrap();
        probe.failed(&server_error());
        drop(probe);
        assert_eq!(
            all[0].snapshot(&pools.policy.breaker).breaker,
            BreakerState::Open
        );

        let other = vec![deployment("b", 0, 1)];
        pools
            .select(&other, &SelectRequest::default())
            .await
            .unwrap()
            .failed(&ProviderError::RateLimited {
                retry_after: Some(Duration::from_millis(40)),
                message: "slow down".into(),
            });
        let snap = other[0].snapshot(&pools.policy.breaker);
        assert_eq!(snap.breaker, BreakerState::Closed);
        assert!(!snap.healthy);
        assert!(
            pools
                .select(&other, &SelectRequest::default())
                .await
                .is_none()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            pools
                .select(&other, &SelectRequest::default())
                .await
                .is_some()
        );
    }

    #[tokio::test]
    async fn error_rate_opens_the_breaker_and_request_errors_do_not_count() {
        let mut policy = RoutingPolicy::default();
        policy.breaker.consecutive_failures = 100;
        policy.breaker.min_requests = 4;
        policy.breaker.error_rate = 0.5;
        let pools = pools(policy);
        let all = vec![deployment("a", 0, 1)];
        for _ in 0..10 {
            pools
                .select(&all, &SelectRequest::default())
                .await
                .unwrap()
                .failed(&ProviderError::ContextTooLong {
                    message: "long".into(),
                });
        }
        assert_eq!(
            all[0].snapshot(&pools.policy.breaker).breaker,
            BreakerState::Closed
        );
        for ok in [true, false, true, false] {
            let mut lease = pools.select(&all, &SelectRequest::default()).await.unwrap();
            if ok {
                lease.succeeded(Duration::from_millis(1));
            } else {
                lease.failed(&server_error());
            }
        }
        assert_eq!(
            all[0].snapshot(&pools.policy.breaker).breaker,
            BreakerState::Open
        );
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let policy = RoutingPolicy::default();
        for n in 0..10 {
            let d = policy.backoff(n, None);
            assert!(d <= policy.backoff_max);
            assert!(d >= (policy.backoff_base * 2u32.pow(n.min(5))).min(policy.backoff_max) / 2);
        }
        assert_eq!(
            policy.backoff(0, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
    }
}
