//! Prometheus metrics: one registry for the process, reached with [`metrics()`].
//!
//! Every component increments the families it owns (the edge counts requests, the pools their
//! selections and calls, the quota engine its rejections); the edge renders the registry at
//! `GET /metrics`. Families have fixed label names whose order is part of the type: a
//! [`CounterFamily<3>`] takes exactly three label values, in the order its field documents, so a
//! wrong arity is a compile error instead of prometheus's runtime panic.
//!
//! Label values must come from small, bounded sets (route templates, provider and deployment ids
//! from config, outcome words) — never user ids, raw paths or error messages.
//!
//! On a hot path, take the series once ([`CounterFamily::child`]) and keep the handle: an
//! increment is then one atomic add, with no label hashing or lock.
//!
//! A family that cannot be built or registered (a programming error, caught by this module's
//! tests) is logged and then behaves as a no-op or as an unexported series; it never panics.

use std::sync::OnceLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
/// The series handles [`CounterFamily::child`] and friends return.
pub use prometheus::{Histogram, IntCounter, IntGauge};

use crate::store::MessageStatus;

/// Buckets of `http_request_duration_seconds`, from 1 ms to 30 s.
const HTTP_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Values of `provider_breaker_state`.
pub const BREAKER_CLOSED: i64 = 0;
pub const BREAKER_HALF_OPEN: i64 = 1;
pub const BREAKER_OPEN: i64 = 2;

/// The families of the process. Label order is given in each field's docs (and in its type's
/// arity).
pub struct Metrics {
    registry: Registry,
    /// `http_requests_total{method, route, status}`: answered requests; `route` is the route
    /// template (`/api/v1/threads/{id}`), `unmatched` for paths no route knows.
    pub http_requests_total: CounterFamily<3>,
    /// `http_request_duration_seconds{route}`: time until the response head was ready (for
    /// streams, not their whole life).
    pub http_request_duration_seconds: HistogramFamily<1>,
    /// `sessions_live`: user session actors alive on this node (set when scraped).
    pub sessions_live: GaugeFamily<0>,
    /// `turns_total{outcome}`: finished turns; `complete` when some model answered in full, else
    /// `interrupted` when some answer was cut short, else `failed`.
    pub turns_total: CounterFamily<1>,
    /// `provider_selections_total{provider, deployment, reason}`: a deployment picked for a
    /// call; `reason` says why (e.g. `primary`, `least_loaded`, `retry`, `fallback`).
    pub provider_selections_total: CounterFamily<3>,
    /// `provider_calls_total{provider, deployment, outcome}`: calls to upstream providers;
    /// `outcome` is `ok` or an error class (`rate_limited`, `timeout`, `server_error`, …).
    pub provider_calls_total: CounterFamily<3>,
    /// `provider_failovers_total{from_model, to_model, reason}`: an answer moved to a fallback
    /// model.
    pub provider_failovers_total: CounterFamily<3>,
    /// `provider_breaker_state{provider, deployment}`: [`BREAKER_CLOSED`] (0),
    /// [`BREAKER_HALF_OPEN`] (1) or [`BREAKER_OPEN`] (2).
    pub provider_breaker_state: GaugeFamily<2>,
    /// `provider_inflight{provider, deployment}`: calls in progress.
    pub provider_inflight: GaugeFamily<2>,
    /// `quota_rejections_total{kind}`: requests refused by a quota (`requests_per_minute`,
    /// `tokens_per_minute`, `monthly_tokens`, …).
    pub quota_rejections_total: CounterFamily<1>,
    /// `quota_backend_degraded{backend}`: 1 while a quota backend (e.g. `redis`) is unreachable
    /// and limits run on the local fallback, else 0.
    pub quota_backend_degraded: GaugeFamily<1>,
    /// `cluster_members{state}`: nodes this node counts in the cluster (itself included), by
    /// state (`alive`, `suspected`, `leaving`).
    pub cluster_members: GaugeFamily<1>,
    /// `cluster_node_events_total{event}`: membership changes seen (`joined`, `suspected`,
    /// `leaving`, `left`, `dead`, `auth_failed`, `tls_failed`).
    pub cluster_node_events_total: CounterFamily<1>,
    /// `cluster_remote_calls_total{outcome}`: user-scoped calls sent to another node's home
    /// session (`ok`, `timeout`, `unreachable`).
    pub cluster_remote_calls_total: CounterFamily<1>,
}

/// The process-wide metrics, registered on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    /// A fresh registry with every family (the process uses [`metrics()`]; tests may build their
    /// own).
    pub fn new() -> Metrics {
        let registry = Registry::new();
        register_process_collector(&registry);
        Metrics {
            http_requests_total: CounterFamily::new(
                &registry,
                "http_requests_total",
                "HTTP requests answered, by method, route template and status",
                ["method", "route", "status"],
            ),
            http_request_duration_seconds: HistogramFamily::new(
                &registry,
                "http_request_duration_seconds",
                "Time from request to response head, by route template",
                ["route"],
                HTTP_BUCKETS,
            ),
            sessions_live: GaugeFamily::new(
                &registry,
                "sessions_live",
                "User session actors alive on this node",
                [],
            ),
            turns_total: CounterFamily::new(
                &registry,
                "turns_total",
                "Finished chat turns, by outcome",
                ["outcome"],
            ),
            provider_selections_total: CounterFamily::new(
                &registry,
                "provider_selections_total",
                "Deployments selected for a provider call, by reason",
                ["provider", "deployment", "reason"],
            ),
            provider_calls_total: CounterFamily::new(
                &registry,
                "provider_calls_total",
                "Calls to upstream providers, by outcome",
                ["provider", "deployment", "outcome"],
            ),
            provider_failovers_total: CounterFamily::new(
                &registry,
                "provider_failovers_total",
                "Answers moved to a fallback model",
                ["from_model", "to_model", "reason"],
            ),
            provider_breaker_state: GaugeFamily::new(
                &registry,
                "provider_breaker_state",
                "Circuit breaker per deployment: 0 closed, 1 half-open, 2 open",
                ["provider", "deployment"],
            ),
            provider_inflight: GaugeFamily::new(
                &registry,
                "provider_inflight",
                "Provider calls in progress per deployment",
                ["provider", "deployment"],
            ),
            quota_rejections_total: CounterFamily::new(
                &registry,
                "quota_rejections_total",
                "Requests refused by a quota, by kind",
                ["kind"],
            ),
            quota_backend_degraded: GaugeFamily::new(
                &registry,
                "quota_backend_degraded",
                "1 while a quota backend is unreachable and limits run locally",
                ["backend"],
            ),
            cluster_members: GaugeFamily::new(
                &registry,
                "cluster_members",
                "Nodes counted in the cluster by this node, by state",
                ["state"],
            ),
            cluster_node_events_total: CounterFamily::new(
                &registry,
                "cluster_node_events_total",
                "Cluster membership changes seen by this node, by event",
                ["event"],
            ),
            cluster_remote_calls_total: CounterFamily::new(
                &registry,
                "cluster_remote_calls_total",
                "User-scoped calls sent to another node's home session, by outcome",
                ["outcome"],
            ),
            registry,
        }
    }

    /// The registry in Prometheus text format (version 0.0.4).
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut buf = Vec::with_capacity(16 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }

    /// Counts a finished turn from the final status of each of its answers.
    pub fn turn_finished(&self, statuses: impl IntoIterator<Item = MessageStatus>) {
        self.turns_total.inc([turn_outcome(statuses)]);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn turn_outcome(statuses: impl IntoIterator<Item = MessageStatus>) -> &'static str {
    let mut outcome = "failed";
    for status in statuses {
        match status {
            MessageStatus::Complete => return "complete",
            MessageStatus::Interrupted => outcome = "interrupted",
            _ => {}
        }
    }
    outcome
}

#[cfg(target_os = "linux")]
fn register_process_collector(registry: &Registry) {
    let collector = prometheus::process_collector::ProcessCollector::for_self();
    if let Err(error) = registry.register(Box::new(collector)) {
        tracing::warn!(%error, "process metrics not registered");
    }
}

#[cfg(not(target_os = "linux"))]
fn register_process_collector(_registry: &Registry) {}

fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    name: &str,
    collector: &C,
) {
    if let Err(error) = registry.register(Box::new(collector.clone())) {
        tracing::error!(%error, metric = name, "metric not registered; it will not be exported");
    }
}

fn unbuilt(name: &str, error: &prometheus::Error) {
    tracing::error!(%error, metric = name, "metric could not be built; it is a no-op");
}

/// A counter with `N` labels.
pub struct CounterFamily<const N: usize>(Option<IntCounterVec>);

impl<const N: usize> CounterFamily<N> {
    fn new(registry: &Registry, name: &str, help: &str, labels: [&str; N]) -> Self {
        match IntCounterVec::new(Opts::new(name, help), &labels) {
            Ok(vec) => {
                register(registry, name, &vec);
                CounterFamily(Some(vec))
            }
            Err(error) => {
                unbuilt(name, &error);
                CounterFamily(None)
            }
        }
    }

    /// The series of these label values, to keep and increment on a hot path.
    pub fn child(&self, labels: [&str; N]) -> Option<IntCounter> {
        self.0.as_ref()?.get_metric_with_label_values(&labels).ok()
    }

    pub fn inc(&self, labels: [&str; N]) {
        self.inc_by(labels, 1);
    }

    pub fn inc_by(&self, labels: [&str; N], by: u64) {
        if let Some(counter) = self.child(labels) {
            counter.inc_by(by);
        }
    }

    /// The current value (0 for a series never incremented).
    pub fn value(&self, labels: [&str; N]) -> u64 {
        self.child(labels).map_or(0, |c| c.get())
    }
}

/// A gauge with `N` labels.
pub struct GaugeFamily<const N: usize>(Option<IntGaugeVec>);

impl<const N: usize> GaugeFamily<N> {
    fn new(registry: &Registry, name: &str, help: &str, labels: [&str; N]) -> Self {
        match IntGaugeVec::new(Opts::new(name, help), &labels) {
            Ok(vec) => {
                register(registry, name, &vec);
                GaugeFamily(Some(vec))
            }
            Err(error) => {
                unbuilt(name, &error);
                GaugeFamily(None)
            }
        }
    }

    /// The series of these label values, to keep on a hot path.
    pub fn child(&self, labels: [&str; N]) -> Option<IntGauge> {
        self.0.as_ref()?.get_metric_with_label_values(&labels).ok()
    }

    pub fn set(&self, labels: [&str; N], value: i64) {
        if let Some(gauge) = self.child(labels) {
            gauge.set(value);
        }
    }

    pub fn inc(&self, labels: [&str; N]) {
        if let Some(gauge) = self.child(labels) {
            gauge.inc();
        }
    }

    pub fn dec(&self, labels: [&str; N]) {
        if let Some(gauge) = self.child(labels) {
            gauge.dec();
        }
    }

    pub fn value(&self, labels: [&str; N]) -> i64 {
        self.child(labels).map_or(0, |g| g.get())
    }
}

/// A histogram with `N` labels.
pub struct HistogramFamily<const N: usize>(Option<HistogramVec>);

impl<const N: usize> HistogramFamily<N> {
    fn new(
        registry: &Registry,
        name: &str,
        help: &str,
        labels: [&str; N],
        buckets: &[f64],
    ) -> Self {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        match HistogramVec::new(opts, &labels) {
            Ok(vec) => {
                register(registry, name, &vec);
                HistogramFamily(Some(vec))
            }
            Err(error) => {
                unbuilt(name, &error);
                HistogramFamily(None)
            }
        }
    }

    /// The series of these label values, to keep on a hot path.
    pub fn child(&self, labels: [&str; N]) -> Option<Histogram> {
        self.0.as_ref()?.get_metric_with_label_values(&labels).ok()
    }

    pub fn observe(&self, labels: [&str; N], value: f64) {
        if let Some(histogram) = self.child(labels) {
            histogram.observe(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_builds_and_registers() {
        let m = Metrics::new();
        assert!(m.http_requests_total.0.is_some());
        assert!(m.http_request_duration_seconds.0.is_some());
        assert!(m.sessions_live.0.is_some());
        assert!(m.turns_total.0.is_some());
        assert!(m.provider_selections_total.0.is_some());
        assert!(m.provider_calls_total.0.is_some());
        assert!(m.provider_failovers_total.0.is_some());
        assert!(m.provider_breaker_state.0.is_some());
        assert!(m.provider_inflight.0.is_some());
        assert!(m.quota_rejections_total.0.is_some());
        assert!(m.quota_backend_degraded.0.is_some());

        m.http_requests_total.inc(["GET", "/healthz", "200"]);
        m.http_request_duration_seconds.observe(["/healthz"], 0.002);
        m.sessions_live.set([], 3);
        m.provider_breaker_state
            .set(["openai", "east"], BREAKER_OPEN);
        m.quota_backend_degraded.set(["redis"], 1);
        let text = m.render().unwrap();
        assert!(
            text.contains(r#"http_requests_total{method="GET",route="/healthz",status="200"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("http_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("sessions_live 3"), "{text}");
        assert!(
            text.contains(r#"quota_backend_degraded{backend="redis"} 1"#),
            "{text}"
        );
        #[cfg(target_os = "linux")]
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }

    #[test]
    fn registering_twice_is_logged_not_fatal() {
        let registry = Registry::new();
        let a = CounterFamily::new(&registry, "twice_total", "help", ["x"]);
        let b = CounterFamily::new(&registry, "twice_total", "help", ["x"]);
        a.inc(["1"]);
        b.inc(["1"]);
        assert_eq!(a.value(["1"]), 1);
        let bad = CounterFamily::new(&registry, "not a name", "help", ["x"]);
        bad.inc(["1"]);
        assert_eq!(bad.value(["1"]), 0);
    }

    #[test]
    fn turn_outcome_prefers_any_complete_answer() {
        use MessageStatus::*;
        assert_eq!(turn_outcome([Failed, Complete]), "complete");
        assert_eq!(turn_outcome([Failed, Interrupted]), "interrupted");
        assert_eq!(turn_outcome([Failed]), "failed");
        assert_eq!(turn_outcome([]), "failed");
    }
}
