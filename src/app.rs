//! Wiring: open the store, start the actor runtime, bind the listener, serve until shutdown.
//!
//! [`Application::build`] binds before it returns, so a caller (the CLI, or a test) knows the
//! real port even when the config asked for port 0. [`Application::run_until`] serves until the
//! given signal, then drains: stop accepting, let in-flight requests finish within
//! `server.shutdown_grace_secs`, stop the actors, return.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use chorus_actors::Node;
use chorus_actors::blob::BlobStore;
use chorus_actors::indexer::Documents;
use chorus_actors::indexer::embed::ForChunks;
use chorus_actors::node::DocumentsConfig;
use chorus_actors::quota::{
    Admission, BucketSpec, KeyedLimiter, LimitSpec, RedisSettings, TokenBuckets, buckets_for,
};
use chorus_actors::session::Sessions;
use chorus_actors::store::{MessageStatus, SqliteStore, Store};
use chorus_cluster::{Cluster, Homes, NodeId};
use tokio::net::TcpListener;

use crate::auth::JwtKeys;
use crate::auth::api_keys::ApiKeyCache;
use crate::auth::jwt::load_or_create_dev_secret;
use crate::auth::sealing::ProviderKeyCipher;
use crate::config::{Config, StoreConfig};
use crate::edge::EdgeThreads;
use crate::http;
use chorus_actors::provider::catalogue::Catalogue;
use chorus_actors::provider::pool::{BreakerPolicy, RoutingPolicy};

/// What every handler can reach. Holds handles, never per-user state.
pub struct AppState {
    pub config: Config,
    pub store: Arc<dyn Store>,
    /// This node's sessions (node-local counts; user-scoped calls go through `homes`).
    pub sessions: Sessions,
    /// Every user-scoped operation goes to the user's home session through this: local, or on
    /// another node of the cluster.
    pub homes: Homes,
    /// Membership, ring and placement (a cluster of one without `[cluster]`).
    pub cluster: Cluster,
    pub jwt: JwtKeys,
    pub provider_keys: Arc<ProviderKeyCipher>,
    /// Enabled models and their providers.
    pub catalogue: Arc<Catalogue>,
    /// Verified API keys, so `/v1` requests make no store call.
    pub api_keys: ApiKeyCache,
    pub limiters: Limiters,
    /// Buckets every node shares (Redis when `[redis] url` is set, else in-process): for limits
    /// that are not per user, such as per-deployment provider RPM/TPM.
    pub shared_buckets: Arc<dyn TokenBuckets>,
    pub metrics: Arc<EdgeMetrics>,
    /// Uploaded documents' blob store and the node's indexer.
    pub documents: Documents,
    /// Turns search queries (and chunks, in the indexer) into vectors; `None`: lexical only.
    pub embedder: Option<Arc<dyn chorus_actors::indexer::embed::Embedder>>,
    /// Set when shutdown begins, so `/readyz` turns 503 while in-flight requests drain.
    pub shutting_down: AtomicBool,
}

/// Per-IP and per-account limits of the public auth routes: in-process on a single node, shared
/// by every node through Redis when `[redis] url` is set (ARCHITECTURE.md, Quotas), so a client
/// spreading its attempts over the nodes gets the same limit as one talking to a single node.
pub struct Limiters {
    pub auth_per_ip: PublicLimit,
    pub login_failures: PublicLimit,
}

impl Limiters {
    /// The limits of `[limits]`; from `shared` (the buckets every node shares) when given.
    pub fn new(
        limits: &crate::config::RawLimits,
        shared: Option<Arc<dyn TokenBuckets>>,
    ) -> Limiters {
        Limiters {
            auth_per_ip: PublicLimit::new(
                "auth_per_ip",
                limits.auth_per_ip_per_minute,
                shared.clone(),
            ),
            login_failures: PublicLimit::new(
                "login_failures",
                limits.login_failures_per_account_per_minute,
                shared,
            ),
        }
    }
}

/// One per-minute limit of a public route, keyed by who is limited (an IP, an account); each
/// event takes one token. The same interface over the in-process limiter and the shared buckets.
pub struct PublicLimit {
    /// Distinguishes this limit's keys in the shared buckets.
    name: &'static str,
    spec: BucketSpec,
    backend: LimitBackend,
}

enum LimitBackend {
    Local(KeyedLimiter),
    Shared(Arc<dyn TokenBuckets>),
}

impl PublicLimit {
    /// `per_minute` events per key per minute (also the burst), kept in `shared` when given,
    /// else in this process.
    pub fn new(
        name: &'static str,
        per_minute: u32,
        shared: Option<Arc<dyn TokenBuckets>>,
    ) -> PublicLimit {
        let backend = match shared {
            Some(buckets) => LimitBackend::Shared(buckets),
            None => LimitBackend::Local(KeyedLimiter::new(LimitSpec::per_minute(per_minute))),
        };
        PublicLimit {
            name,
            spec: BucketSpec::per_minute(u64::from(per_minute)),
            backend,
        }
    }

    /// Takes one token for `key` if there is one; the answer carries the headers' figures.
    pub async fn acquire(&self, key: &str) -> Admission {
        match &self.backend {
            LimitBackend::Local(limiter) => limiter.acquire(key).into(),
            LimitBackend::Shared(buckets) => {
                buckets.try_take(&self.shared_key(key), self.spec, 1).await
            }
        }
    }

    /// Gives back a token taken by [`acquire`](Self::acquire) (the event turned out not to
    /// count, e.g. a login that succeeded). Never fills past the limit.
    pub async fn refund(&self, key: &str) {
        match &self.backend {
            LimitBackend::Local(limiter) => limiter.refund(key),
            LimitBackend::Shared(buckets) => {
                buckets.adjust(&self.shared_key(key), self.spec, -1).await;
            }
        }
    }

    /// "local" or the shared buckets' backend ("redis").
    pub fn backend(&self) -> &'static str {
        match &self.backend {
            LimitBackend::Local(_) => "local",
            LimitBackend::Shared(buckets) => buckets.backend(),
        }
    }

    fn shared_key(&self, key: &str) -> String {
        format!("edge:{}:{key}", self.name)
    }
}

/// Counters the edge keeps for itself (Prometheus export comes with observability).
#[derive(Default)]
pub struct EdgeMetrics {
    in_flight: AtomicUsize,
}

impl EdgeMetrics {
    /// Counts a request as in flight until the guard drops.
    pub fn begin_request(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

pub struct InFlightGuard(Arc<EdgeMetrics>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Queues the unfinished documents of the users homed here once the node has joined (the
/// indexer's own start-up pass found none: the node was nobody's home yet).
fn resume_after_joining(cluster: Cluster, indexer: chorus_actors::indexer::Indexer) {
    tokio::spawn(async move {
        while cluster.is_joining() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        indexer.resume();
    });
}

/// Opens (and migrates) the configured store, serving this node (`config.node_name`: the owner
/// recorded on the messages it streams).
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let node = config.node_name.clone();
    match &config.store {
        StoreConfig::Sqlite { path } => {
            let path = path.clone();
            let store =
                tokio::task::spawn_blocking(move || SqliteStore::open_for_node(&path, &node))
                    .await
                    .context("opening the SQLite store")?
                    .context("opening the SQLite store")?;
            Ok(Arc::new(store))
        }
    }
}

/// The cipher for users' provider keys; without a configured secret, a dev one in the data dir.
pub fn provider_key_cipher(config: &Config) -> anyhow::Result<ProviderKeyCipher> {
    let secret = match &config.auth.provider_keys_secret {
        Some(secret) => secret.expose().as_bytes().to_vec(),
        None => {
            tracing::warn!(
                path = %config.data_dir.join("provider-keys-secret").display(),
                "no auth.provider_keys_secret configured: sealing users' provider keys with a \
                 generated DEV secret kept in the data dir. Set CHORUS__AUTH__PROVIDER_KEYS_SECRET \
                 (32+ bytes) in production."
            );
            load_or_create_dev_secret(&config.data_dir, "provider-keys-secret")?
        }
    };
    Ok(ProviderKeyCipher::from_secret(&secret)?)
}

/// Signing keys from config; without a configured HS256 secret, the dev secret in the data dir.
pub fn jwt_keys(config: &Config) -> anyhow::Result<JwtKeys> {
    let dev_secret = if config.auth.secret.is_none()
        && config.auth.algorithm == crate::config::JwtAlgorithm::Hs256
    {
        tracing::warn!(
            path = %config.data_dir.join("jwt-secret").display(),
            "no auth.jwt_secret configured: signing tokens with a generated DEV secret kept in the \
             data dir. Set CHORUS__AUTH__JWT_SECRET (32+ bytes) in production."
        );
        Some(load_or_create_dev_secret(&config.data_dir, "jwt-secret")?)
    } else {
        None
    };
    Ok(JwtKeys::from_config(&config.auth, dev_secret.as_deref())?)
}

/// `[routing]` as the pools take it.
fn routing_policy(raw: &crate::config::RawRouting) -> RoutingPolicy {
    RoutingPolicy {
        max_attempts: raw.max_attempts,
        deadline: Duration::from_secs(raw.deadline_secs),
        backoff_base: Duration::from_millis(raw.backoff_base_ms),
        backoff_max: Duration::from_millis(raw.backoff_max_ms.max(raw.backoff_base_ms)),
        continue_after_cut: raw.continue_after_cut,
        breaker: BreakerPolicy {
            consecutive_failures: raw.breaker_consecutive_failures.max(1),
            error_rate: raw.breaker_error_rate,
            min_requests: raw.breaker_min_requests.max(1),
            window: Duration::from_secs(raw.breaker_window_secs.max(1)),
            cooldown: Duration::from_secs(raw.breaker_cooldown_secs),
            probes: raw.breaker_probes,
        },
    }
}

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: Arc<AppState>,
    node: Node,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        let jwt = jwt_keys(&config)?;
        let provider_keys = Arc::new(provider_key_cipher(&config)?);
        let store = open_store(&config).await?;
        // Turns this node was streaming when its previous process died have no owner any more:
        // settle them as interrupted, keeping the text they had flushed (ARCHITECTURE.md,
        // principle 4). Only this node's messages (and unowned ones from before owners were
        // recorded): other nodes sharing the store may still be running theirs.
        let reaped = store
            .settle_orphaned_messages(chrono::Utc::now(), MessageStatus::Interrupted)
            .await?;
        if reaped > 0 {
            tracing::warn!(
                reaped,
                "settled messages left streaming by a previous run as interrupted"
            );
        }
        // Per-deployment limits are shared by every node through Redis when it is configured,
        // else kept in this process (ARCHITECTURE.md, Quotas).
        let shared_buckets = buckets_for(config.redis.url.as_ref().map(|url| RedisSettings {
            url: url.expose().to_owned(),
            key_prefix: config.redis.key_prefix.clone(),
            response_timeout: config.redis.response_timeout,
            fallback_share: config.redis.fallback_share,
        }))
        .await;
        // Providers are enabled by their keys in the environment (ARCHITECTURE.md, Configuration).
        let catalogue = Arc::new(
            Catalogue::build_with(
                &config.catalogue,
                &|name| std::env::var(name).ok(),
                routing_policy(&config.routing),
                Some(shared_buckets.clone()),
            )
            .context("building the model catalogue")?,
        );
        tracing::info!(
            models = ?catalogue.models().iter().map(|m| m.spec.id.as_str()).collect::<Vec<_>>(),
            "model catalogue ready"
        );
        let mut sessions = config.sessions.clone();
        sessions.key_opener = Some(provider_keys.clone());
        // Without a usable embedder (e.g. the local model not fetched) retrieval is lexical
        // only, and says so (`mode` in search results).
        let embedder =
            chorus_actors::indexer::embed::build_or_lexical(&config.embeddings, &catalogue).await;
        tracing::info!(
            embedder = embedder.as_ref().map_or("none (lexical only)", |e| e.id()),
            "embeddings"
        );
        let mut indexer = config.documents.indexer.clone();
        // A cluster node resumes only the unfinished documents of users homed on it, once it
        // knows which those are (see `resume_after_joining`); other nodes resume theirs.
        let cluster_slot: Arc<std::sync::OnceLock<Cluster>> = Arc::default();
        if config.cluster.is_some() {
            let slot = cluster_slot.clone();
            indexer.resume_users = Some(Arc::new(move |user| {
                slot.get()
                    .is_some_and(|cluster| !cluster.is_joining() && cluster.is_home(user))
            }));
        }
        indexer.embedder = embedder
            .clone()
            .map(|e| Arc::new(ForChunks(e)) as Arc<dyn chorus_actors::indexer::ChunkEmbedder>);
        let blobs = BlobStore::open(&config.documents.blobs).context("opening the blob store")?;
        tracing::info!(kind = blobs.kind(), "blob store ready");
        let node = Node::start_with(
            store.clone(),
            catalogue.clone(),
            sessions,
            Some(DocumentsConfig { blobs, indexer }),
        )
        .await?;
        let documents = node
            .documents
            .clone()
            .context("the node started without documents")?;
        let listener = TcpListener::bind(config.server.bind)
            .await
            .with_context(|| format!("binding {}", config.server.bind))?;
        let local_addr = listener.local_addr()?;
        // Per-IP and per-account limits of the public routes: shared through Redis in a
        // cluster, so they hold whichever node a client talks to.
        let limiters = Limiters::new(
            &config.limits,
            config.redis.url.is_some().then(|| shared_buckets.clone()),
        );
        tracing::info!(
            backend = limiters.auth_per_ip.backend(),
            "public route limits"
        );
        // How long a home waits for a turn's first outcome before the edge commits to a 200.
        let first_wait = config.sessions.turn_timeouts.first_token + Duration::from_secs(5);
        let cluster = match &config.cluster {
            Some(settings) => Cluster::start(
                settings.cluster.clone(),
                node.sessions.clone(),
                store.clone(),
                first_wait,
            )
            .await
            .context("starting the cluster")?,
            None => Cluster::single(
                NodeId::new(config.node_name.clone()),
                node.sessions.clone(),
                first_wait,
            ),
        };
        if cluster.is_clustered() {
            let _ = cluster_slot.set(cluster.clone());
            resume_after_joining(cluster.clone(), documents.indexer.clone());
        }
        let state = Arc::new(AppState {
            sessions: node.sessions.clone(),
            homes: cluster.homes().clone(),
            cluster,
            config,
            store,
            jwt,
            provider_keys,
            catalogue,
            api_keys: ApiKeyCache::default(),
            limiters,
            shared_buckets,
            metrics: Arc::new(EdgeMetrics::default()),
            documents,
            embedder,
            shutting_down: AtomicBool::new(false),
        });
        Ok(Application {
            listener,
            local_addr,
            state,
            node,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then drains and stops.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let Application {
            listener,
            local_addr,
            state,
            node,
        } = self;
        let grace = state.config.server.shutdown_grace;
        let threads = crate::edge::thread_count(state.config.server.edge_threads);
        let listener = listener
            .into_std()
            .context("handing the listener to the edge threads")?;
        let (edge, mut server) = EdgeThreads::start(
            listener,
            threads,
            state.config.server.header_read_timeout,
            http::Routes::new(state.clone()),
        )
        .context("starting the edge threads")?;
        // Membership changes: passivate users homed elsewhere now, reap a vanished node's turns.
        let handoff = state
            .cluster
            .is_clustered()
            .then(|| crate::handoff::spawn(state.clone()));
        tracing::info!(addr = %local_addr, edge_threads = threads, "listening");
        tokio::select! {
            () = shutdown => {}
            () = server.one_ended() => {
                anyhow::bail!("HTTP server stopped unexpectedly");
            }
        }
        state.shutting_down.store(true, Ordering::Relaxed);
        if let Some(settings) = &state.config.cluster {
            // Leave the ring first: peers home this node's users elsewhere from now on, while
            // it keeps serving (readyz says 503) until load balancers have stopped sending.
            state.cluster.leave().await;
            tracing::info!(
                drain_ms = settings.leave_drain.as_millis() as u64,
                "leaving: out of the ring, serving until load balancers notice"
            );
            tokio::select! {
                () = tokio::time::sleep(settings.leave_drain) => {}
                () = server.all_ended() => {}
            }
        }
        tracing::info!(
            in_flight = state.metrics.in_flight(),
            grace_secs = grace.as_secs(),
            "shutdown: no longer accepting; draining in-flight requests"
        );
        edge.stop_accepting();
        if tokio::time::timeout(grace, server.all_ended())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = state.metrics.in_flight(),
                "shutdown grace elapsed; closing remaining connections"
            );
        }
        if let Some(settings) = &state.config.cluster {
            wait_for_turns(&state, settings.leave_deadline).await;
        }
        if let Some(handoff) = handoff {
            handoff.abort();
        }
        node.shutdown().await;
        state.cluster.stop().await;
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// Waits (up to `deadline`) for the turns running on this node to finish, so a leaving node's
/// answers are stored complete rather than interrupted.
async fn wait_for_turns(state: &AppState, deadline: Duration) {
    let started = std::time::Instant::now();
    loop {
        let running = state.sessions.running_turns();
        if running == 0 {
            return;
        }
        if started.elapsed() >= deadline {
            tracing::warn!(running, "leave deadline reached with turns still running");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
