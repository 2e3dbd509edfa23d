//! A fake LLM upstream for Chorus's tests and load tests.
//!
//! It speaks three providers' wire formats as their public API references describe them —
//! OpenAI chat completions (plus models and embeddings), Anthropic messages, Gemini
//! `generateContent` / `streamGenerateContent` — streaming and not, so that Chorus's provider
//! adapters run against it unchanged once their base URLs point here. Answers are
//! deterministic (an echo of the last user message by default; one token per word), and
//! switches inject latency and failures: see [`options`] and the crate README.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! let mock = chorus_mock_upstream::MockUpstream::start().await?;
//! let openai_base = format!("{}/v1", mock.base_url());
//! // ... point a client at it; a model named "gpt;ttft_ms=200;error_after=3" misbehaves.
//! assert!(mock.requests().is_empty());
//! # Ok(()) }
//! ```

mod anthropic;
mod gemini;
mod openai;
pub mod options;
mod server;
mod text;
mod wire;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warp::Filter;

pub use options::{Behavior, Failure, OptionsError};

use server::{Layers, State};

/// How a mock server is set up.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Where to listen; port 0 picks a free one.
    pub bind: SocketAddr,
    /// Embedding dimension when neither the request (`dimensions`) nor `dims=` says.
    pub embedding_dims: usize,
    /// Model ids listed by `GET /v1/models` (models given options are listed too).
    pub models: Vec<String>,
    /// Options applied to every request, e.g. `delay_ms=5`.
    pub default_options: String,
    /// Options per base model name: `("gpt-4o", "ttft_ms=200")`.
    pub model_options: Vec<(String, String)>,
    /// Whether to keep [`RecordedRequest`]s (off for load tests).
    pub record_requests: bool,
    /// How many recorded requests to keep (the oldest are dropped).
    pub max_recorded: usize,
    /// How long `hang=1` holds a request before answering 504.
    pub hang_timeout: Duration,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            embedding_dims: 8,
            models: vec!["mock-model".to_owned()],
            default_options: String::new(),
            model_options: Vec::new(),
            record_requests: true,
            max_recorded: 10_000,
            hang_timeout: Duration::from_secs(600),
        }
    }
}

/// One request as the mock received it, for tests to assert what a client sent.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    /// The path as sent (not percent-decoded), without the query.
    pub path: String,
    /// The raw query string (empty if none).
    pub query: String,
    /// Every header, names lower-case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The JSON body; `Null` if empty, a JSON string holding the raw text if not JSON.
    pub body: serde_json::Value,
    /// When the request (headers and body) had been read.
    pub received_at: std::time::Instant,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// A running mock server; it stops when dropped or on [`MockUpstream::shutdown`].
#[derive(Debug)]
pub struct MockUpstream {
    /// The address it listens on.
    pub addr: SocketAddr,
    state: Arc<State>,
    task: Option<JoinHandle<()>>,
}

impl MockUpstream {
    /// Starts a server on `127.0.0.1:0` with the default configuration.
    pub async fn start() -> std::io::Result<MockUpstream> {
        MockUpstream::start_with(MockConfig::default()).await
    }

    /// Starts a server with `config`.
    pub async fn start_with(config: MockConfig) -> std::io::Result<MockUpstream> {
        let listener = TcpListener::bind(config.bind).await?;
        MockUpstream::serve(listener, config)
    }

    /// Serves on an already-bound listener (`config.bind` is ignored).
    pub fn serve(listener: TcpListener, config: MockConfig) -> std::io::Result<MockUpstream> {
        let addr = listener.local_addr()?;
        let invalid = |e: OptionsError| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let mut layers = Layers {
            defaults: Behavior::parse(&config.default_options).map_err(invalid)?,
            per_model: HashMap::new(),
        };
        for (model, options) in &config.model_options {
            layers
                .per_model
                .insert(model.clone(), Behavior::parse(options).map_err(invalid)?);
        }
        let state = Arc::new(State {
            layers: RwLock::new(layers),
            models: config.models,
            embedding_dims: config.embedding_dims.max(1),
            hang_timeout: config.hang_timeout,
            fail_counts: Mutex::new(HashMap::new()),
            request_count: AtomicU64::new(0),
            active_hangs: AtomicU64::new(0),
            recorded: config.record_requests.then(|| Mutex::new(VecDeque::new())),
            max_recorded: config.max_recorded.max(1),
            id_prefix: uuid::Uuid::new_v4().simple().to_string()[..8].to_owned(),
            next_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
        });

        let handler_state = Arc::clone(&state);
        let routes = warp::method()
            .and(warp::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then(
                move |method, path: warp::path::FullPath, query, headers, body| {
                    server::handle(
                        Arc::clone(&handler_state),
                        method,
                        path.as_str().to_owned(),
                        query,
                        headers,
                        body,
                    )
                },
            );
        let shutdown = state.shutdown.clone();
        let task = tokio::spawn(
            warp::serve(routes)
                .incoming(listener)
                .graceful(shutdown.cancelled_owned())
                .run(),
        );
        Ok(MockUpstream {
            addr,
            state,
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:PORT` — the base URL for all three dialects (OpenAI clients usually
    /// want `{base_url}/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many requests arrived (any path, any outcome).
    pub fn request_count(&self) -> u64 {
        self.state.request_count.load(Ordering::Relaxed)
    }

    /// The recorded requests, oldest first (empty if recording is off).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        match &self.state.recorded {
            Some(recorded) => recorded
                .lock()
                .map(|recorded| recorded.iter().cloned().collect())
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        if let Some(recorded) = &self.state.recorded
            && let Ok(mut recorded) = recorded.lock()
        {
            recorded.clear();
        }
    }

    /// Requests currently held by `hang=1`.
    pub fn active_hangs(&self) -> u64 {
        self.state.active_hangs.load(Ordering::Relaxed)
    }

    /// Sets the options for a base model name (replacing earlier ones), e.g.
    /// `set_model_options("gpt-4o", "error=503")`; an empty string clears them.
    pub fn set_model_options(&self, model: &str, options: &str) -> Result<(), OptionsError> {
        let behavior = Behavior::parse(options)?;
        if let Ok(mut layers) = self.state.layers.write() {
            if options.trim().is_empty() {
                layers.per_model.remove(model);
            } else {
                layers.per_model.insert(model.to_owned(), behavior);
            }
        }
        Ok(())
    }

    /// Sets the options applied to every request (replacing earlier defaults).
    pub fn set_default_options(&self, options: &str) -> Result<(), OptionsError> {
        let behavior = Behavior::parse(options)?;
        if let Ok(mut layers) = self.state.layers.write() {
            layers.defaults = behavior;
        }
        Ok(())
    }

    /// Resets the `fail_first` / `fail_every` counters.
    pub fn reset_fail_counts(&self) {
        if let Ok(mut counts) = self.state.fail_counts.lock() {
            counts.clear();
        }
    }

    /// Stops accepting, releases hung requests, cuts running streams, and waits (up to 5 s)
    /// for connections to close.
    pub async fn shutdown(mut self) {
        self.state.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.state.shutdown.cancel();
    }
}
