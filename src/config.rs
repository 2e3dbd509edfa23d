//! Configuration: defaults (`config/chorus.toml`, compiled in) → optional file → environment.
//!
//! The three layers are merged as TOML tables, then deserialized strictly (`deny_unknown_fields`,
//! with `serde_path_to_error` so an error names the exact key), then validated into [`Config`].
//! The environment is passed in rather than read here, so tests never touch process state.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// The defaults, one comment per key. Also the reference for operators.
pub const DEFAULTS_TOML: &str = include_str!("../config/chorus.toml");
/// The built-in model catalogue.
pub const DEFAULT_MODELS_TOML: &str = include_str!("../config/models.toml");
/// The built-in tiers.
pub const DEFAULT_TIERS_TOML: &str = include_str!("../config/tiers.toml");
const ENV_PREFIX: &str = "CHORUS__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// A secret string: redacted in `Debug` and when the config is printed.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    #[cfg(test)]
    pub fn from_test(value: &str) -> Secret {
        Secret(value.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<redacted>"
        })
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "<redacted>" })
    }
}

/// The file format, exactly as written in chorus.toml.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub data_dir: PathBuf,
    pub models_file: String,
    pub tiers_file: String,
    pub server: RawServer,
    pub auth: RawAuth,
    pub store: RawStore,
    pub sessions: RawSessions,
    pub turns: RawTurns,
    pub limits: RawLimits,
    pub routing: RawRouting,
    pub redis: RawRedis,
    pub cluster: RawCluster,
    pub billing: RawBilling,
    pub metrics: RawMetrics,
    pub log: RawLog,
    pub documents: RawDocuments,
    pub embeddings: RawEmbeddings,
}

/// `[documents]`: where uploads are kept and how they are ingested.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDocuments {
    pub blob_root: String,
    pub s3_bucket: String,
    pub s3_endpoint: String,
    pub s3_region: String,
    pub s3_access_key_id: Secret,
    pub s3_secret_access_key: Secret,
    pub s3_path_style: bool,
    pub ingest_concurrency: usize,
    pub chunk_target_tokens: usize,
    pub chunk_overlap_tokens: usize,
    pub max_text_bytes: usize,
    pub extract_timeout_secs: u64,
    pub ocr_tesseract: String,
    pub ocr_pdftoppm: String,
}

/// `[embeddings]`: how chunks and queries become vectors for retrieval.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmbeddings {
    pub kind: String,
    pub local_model_dir: String,
    pub provider_model: String,
    pub batch_size: usize,
}

/// `[routing]`: retries, failover and circuit breakers of the provider pools.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouting {
    pub max_attempts: u32,
    pub deadline_secs: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub continue_after_cut: bool,
    pub breaker_consecutive_failures: u32,
    pub breaker_error_rate: f64,
    pub breaker_min_requests: u32,
    pub breaker_window_secs: u64,
    pub breaker_cooldown_secs: u64,
    pub breaker_probes: u32,
}

/// `[redis]`: limits shared by all nodes; an empty `url` keeps them in-process.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: Secret,
    pub key_prefix: String,
    pub response_timeout_ms: u64,
    pub fallback_share: f64,
}

/// `[cluster]`: node-to-node membership. An empty `listen` keeps the node a cluster of one.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub node_name: String,
    pub listen: String,
    pub advertise: String,
    pub cookie: Secret,
    /// PEM files of mutual TLS between nodes: all three, or none (plain TCP).
    pub tls_cert: String,
    pub tls_key: String,
    pub tls_ca: String,
    pub seeds: Vec<String>,
    pub seed_dns: String,
    pub dns_refresh_secs: u64,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub join_timeout_ms: u64,
    pub call_timeout_ms: u64,
    pub vnodes: usize,
    pub leave_drain_ms: u64,
    pub leave_deadline_secs: u64,
}

/// `[billing]`: the signed webhook that changes tiers; an empty secret turns it off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBilling {
    pub webhook_secret: Secret,
    pub tolerance_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTurns {
    pub first_token_timeout_secs: u64,
    pub between_chunks_timeout_secs: u64,
    pub keep_alive_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub bind: String,
    pub body_limit_bytes: u64,
    pub cors_origins: Vec<String>,
    pub shutdown_grace_secs: u64,
    pub header_read_timeout_secs: u64,
    pub worker_threads: usize,
    pub edge_threads: usize,
    pub trust_forwarded_for: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub jwt_algorithm: String,
    pub jwt_secret: Secret,
    pub jwt_kid: String,
    pub jwt_private_key_file: String,
    pub jwt_public_key_file: String,
    pub jwt_previous_public_keys: Vec<PreviousKey>,
    pub jwt_issuer: String,
    pub access_token_ttl_secs: u64,
    pub refresh_token_ttl_secs: u64,
    pub provider_keys_secret: Secret,
    pub password_min_chars: usize,
    pub password_max_chars: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PreviousKey {
    pub kid: String,
    pub file: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub kind: String,
    pub sqlite_path: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSessions {
    pub idle_timeout_secs: u64,
    pub call_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub auth_per_ip_per_minute: u32,
    pub login_failures_per_account_per_minute: u32,
    pub title_max_chars: usize,
    pub system_prompt_max_chars: usize,
    pub message_max_chars: usize,
    pub name_max_chars: usize,
    pub api_keys_per_user: usize,
}

/// `[metrics]`: basic auth of `GET /metrics`; both empty leaves it open.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub basic_auth_user: String,
    pub basic_auth_password: Secret,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: String,
    pub level: String,
}

/// The validated configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The merged file form, kept for `config check`.
    pub raw: RawConfig,
    pub data_dir: PathBuf,
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub store: StoreConfig,
    pub sessions: chorus_actors::session::SessionConfig,
    pub catalogue: chorus_actors::provider::catalogue::CatalogueFile,
    pub tiers: chorus_actors::quota::tiers::Tiers,
    pub keep_alive: Duration,
    pub limits: RawLimits,
    pub routing: RawRouting,
    pub redis: RedisConfig,
    /// `None`: a cluster of one.
    pub cluster: Option<ClusterSettings>,
    /// This node's name: `[cluster] node_name`, else the hostname.
    pub node_name: String,
    pub billing: BillingConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub documents: DocumentsSettings,
    pub embeddings: chorus_actors::indexer::embed::EmbeddingsConfig,
}

/// `[documents]`, validated.
#[derive(Debug, Clone)]
pub struct DocumentsSettings {
    pub blobs: chorus_actors::blob::BlobConfig,
    pub indexer: chorus_actors::indexer::IndexerConfig,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `None`: limits stay in-process.
    pub url: Option<Secret>,
    pub key_prefix: String,
    pub response_timeout: Duration,
    /// The fraction of a shared limit this node admits on its own while Redis is unreachable.
    pub fallback_share: f64,
}

/// `[cluster]`, validated.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub cluster: chorus_cluster::ClusterConfig,
    /// After SIGTERM, how long the node keeps serving (with `/readyz` at 503, out of the ring)
    /// before it stops accepting, so that load balancers stop sending first.
    pub leave_drain: Duration,
    /// Longest wait for turns running here to finish before exiting anyway.
    pub leave_deadline: Duration,
}

#[derive(Debug, Clone)]
pub struct BillingConfig {
    /// `None`: the webhook answers 404 (billing is off).
    pub webhook_secret: Option<Secret>,
    /// How far a signed event's timestamp may be from now (replay protection).
    pub tolerance: Duration,
}

#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// `None`: `/metrics` needs no credentials.
    pub basic_auth: Option<BasicAuth>,
}

#[derive(Debug, Clone)]
pub struct BasicAuth {
    pub user: String,
    pub password: Secret,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    pub body_limit_bytes: u64,
    pub cors: CorsOrigins,
    pub shutdown_grace: Duration,
    /// The longest wait for a request's head, idle keep-alive included; `None`: no limit.
    pub header_read_timeout: Option<Duration>,
    /// Threads of the actors' runtime; 0: one per core.
    pub worker_threads: usize,
    /// Threads serving HTTP connections (`src/edge.rs`); 0: one per core.
    pub edge_threads: usize,
    pub trust_forwarded_for: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CorsOrigins {
    None,
    Any,
    List(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    Hs256,
    Rs256,
    EdDsa,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub algorithm: JwtAlgorithm,
    /// HS256 secret; `None` means "generate a dev secret in the data dir".
    pub secret: Option<Secret>,
    pub kid: String,
    pub private_key_file: Option<PathBuf>,
    pub public_key_file: Option<PathBuf>,
    pub previous_public_keys: Vec<PreviousKey>,
    pub issuer: String,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    /// `None` means "generate a dev secret in the data dir".
    pub provider_keys_secret: Option<Secret>,
    pub password_min_chars: usize,
    pub password_max_chars: usize,
}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Sqlite { path: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Config {
    /// Loads the layers and validates them. `env` is the process environment (or a test's).
    pub fn load<I>(file: Option<&Path>, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let defaults = parse_table(DEFAULTS_TOML, "built-in defaults (config/chorus.toml)")?;
        let mut merged = defaults.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let overlay = parse_table(&text, &path.display().to_string())?;
            merge(&mut merged, overlay);
        }
        apply_env(&mut merged, &defaults, env)?;
        let raw: RawConfig =
            serde_path_to_error::deserialize(Value::Table(merged)).map_err(|err| {
                let path = err.path().to_string();
                ConfigError::Invalid {
                    key: if path == "." {
                        "(top level)".into()
                    } else {
                        path
                    },
                    message: err.into_inner().to_string(),
                }
            })?;
        Config::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        if raw.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let bind: SocketAddr = raw.server.bind.parse().map_err(|e| {
            invalid(
                "server.bind",
                format!("`{}` is not an address:port ({e})", raw.server.bind),
            )
        })?;
        if raw.server.body_limit_bytes == 0 {
            return Err(invalid("server.body_limit_bytes", "must be greater than 0"));
        }
        let cors = parse_cors(&raw.server.cors_origins)?;
        for (key, threads) in [
            ("server.worker_threads", raw.server.worker_threads),
            ("server.edge_threads", raw.server.edge_threads),
        ] {
            if threads > 1024 {
                return Err(invalid(key, "must be at most 1024 (0 = one per core)"));
            }
        }

        let auth = validate_auth(&raw.auth)?;

        let store = match raw.store.kind.as_str() {
            "sqlite" => StoreConfig::Sqlite {
                path: if raw.store.sqlite_path.is_empty() {
                    raw.data_dir.join("chorus.db")
                } else {
                    PathBuf::from(&raw.store.sqlite_path)
                },
            },
            other => {
                return Err(invalid(
                    "store.kind",
                    format!("unsupported store `{other}` (supported: sqlite)"),
                ));
            }
        };

        for (key, value) in [
            (
                "turns.first_token_timeout_secs",
                raw.turns.first_token_timeout_secs,
            ),
            (
                "turns.between_chunks_timeout_secs",
                raw.turns.between_chunks_timeout_secs,
            ),
            ("turns.keep_alive_secs", raw.turns.keep_alive_secs),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        let catalogue = load_catalogue(&raw.models_file)?;
        let tiers = load_tiers(&raw.tiers_file)?;
        let routing = &raw.routing;
        if routing.max_attempts == 0 || routing.deadline_secs == 0 {
            return Err(invalid(
                "routing.max_attempts",
                "max_attempts and deadline_secs must be greater than 0",
            ));
        }
        if !(0.0..=1.0).contains(&routing.breaker_error_rate) || routing.breaker_probes == 0 {
            return Err(invalid(
                "routing.breaker_error_rate",
                "must be within 0..=1 (and breaker_probes > 0)",
            ));
        }
        if !(raw.redis.fallback_share > 0.0 && raw.redis.fallback_share <= 1.0) {
            return Err(invalid("redis.fallback_share", "must be within (0, 1]"));
        }
        if raw.redis.response_timeout_ms == 0 {
            return Err(invalid(
                "redis.response_timeout_ms",
                "must be greater than 0",
            ));
        }
        let redis = RedisConfig {
            url: (!raw.redis.url.expose().is_empty()).then(|| raw.redis.url.clone()),
            key_prefix: raw.redis.key_prefix.clone(),
            response_timeout: Duration::from_millis(raw.redis.response_timeout_ms),
            fallback_share: raw.redis.fallback_share,
        };
        let node_name = if raw.cluster.node_name.trim().is_empty() {
            std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "local".into())
        } else {
            raw.cluster.node_name.trim().to_owned()
        };
        let cluster = validate_cluster(&raw.cluster, &node_name)?;
        let billing = BillingConfig {
            webhook_secret: (!raw.billing.webhook_secret.expose().is_empty())
                .then(|| raw.billing.webhook_secret.clone()),
            tolerance: Duration::from_secs(raw.billing.tolerance_secs.max(1)),
        };
        let metrics = MetricsConfig {
            basic_auth: match (
                raw.metrics.basic_auth_user.is_empty(),
                raw.metrics.basic_auth_password.is_empty(),
            ) {
                (true, true) => None,
                (false, false) => Some(BasicAuth {
                    user: raw.metrics.basic_auth_user.clone(),
                    password: raw.metrics.basic_auth_password.clone(),
                }),
                (true, false) => {
                    return Err(invalid(
                        "metrics.basic_auth_user",
                        "must be set when metrics.basic_auth_password is",
                    ));
                }
                (false, true) => {
                    return Err(invalid(
                        "metrics.basic_auth_password",
                        "must be set when metrics.basic_auth_user is",
                    ));
                }
            },
        };
        if raw.metrics.basic_auth_user.contains(':') {
            return Err(invalid(
                "metrics.basic_auth_user",
                "must not contain `:` (basic auth separates user and password with it)",
            ));
        }
        if raw.sessions.idle_timeout_secs == 0 {
            return Err(invalid(
                "sessions.idle_timeout_secs",
                "must be greater than 0",
            ));
        }
        if raw.sessions.call_timeout_secs == 0 {
            return Err(invalid(
                "sessions.call_timeout_secs",
                "must be greater than 0",
            ));
        }
        for (key, value) in [
            (
                "limits.auth_per_ip_per_minute",
                raw.limits.auth_per_ip_per_minute as usize,
            ),
            (
                "limits.login_failures_per_account_per_minute",
                raw.limits.login_failures_per_account_per_minute as usize,
            ),
            ("limits.title_max_chars", raw.limits.title_max_chars),
            (
                "limits.system_prompt_max_chars",
                raw.limits.system_prompt_max_chars,
            ),
            ("limits.message_max_chars", raw.limits.message_max_chars),
            ("limits.name_max_chars", raw.limits.name_max_chars),
            ("limits.api_keys_per_user", raw.limits.api_keys_per_user),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }

        let documents = validate_documents(&raw.documents, &raw.data_dir)?;

        let format = match raw.log.format.as_str() {
            "json" => LogFormat::Json,
            "pretty" => LogFormat::Pretty,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("`{other}` is not one of: json, pretty"),
                ));
            }
        };
        if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a valid filter", raw.log.level),
            ));
        }

        let embeddings = validate_embeddings(&raw, &catalogue)?;

        Ok(Config {
            data_dir: raw.data_dir.clone(),
            server: ServerConfig {
                bind,
                body_limit_bytes: raw.server.body_limit_bytes,
                cors,
                shutdown_grace: Duration::from_secs(raw.server.shutdown_grace_secs),
                header_read_timeout: (raw.server.header_read_timeout_secs > 0)
                    .then(|| Duration::from_secs(raw.server.header_read_timeout_secs)),
                worker_threads: raw.server.worker_threads,
                edge_threads: raw.server.edge_threads,
                trust_forwarded_for: raw.server.trust_forwarded_for,
            },
            auth,
            store,
            sessions: chorus_actors::session::SessionConfig {
                idle_timeout: Duration::from_secs(raw.sessions.idle_timeout_secs),
                call_timeout: Duration::from_secs(raw.sessions.call_timeout_secs),
                turn_timeouts: chorus_actors::session::turn::TurnTimeouts {
                    first_token: Duration::from_secs(raw.turns.first_token_timeout_secs),
                    between_chunks: Duration::from_secs(raw.turns.between_chunks_timeout_secs),
                },
                // Set by the application, which holds the master key.
                key_opener: None,
                tiers: std::sync::Arc::new(tiers.clone()),
                ..Default::default()
            },
            catalogue,
            tiers,
            keep_alive: Duration::from_secs(raw.turns.keep_alive_secs),
            limits: raw.limits.clone(),
            routing: raw.routing.clone(),
            redis,
            cluster,
            node_name,
            billing,
            metrics,
            log: LogConfig {
                format,
                level: raw.log.level.clone(),
            },
            documents,
            embeddings,
            raw,
        })
    }

    /// The effective configuration as TOML, secrets redacted (`chorus config check`).
    pub fn to_redacted_toml(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(&self.raw).map_err(|e| ConfigError::Parse {
            origin: "effective config".into(),
            message: e.to_string(),
        })
    }
}

fn validate_cluster(
    raw: &RawCluster,
    node_name: &str,
) -> Result<Option<ClusterSettings>, ConfigError> {
    if raw.listen.trim().is_empty() {
        return Ok(None);
    }
    let listen: SocketAddr = raw.listen.trim().parse().map_err(|e| {
        invalid(
            "cluster.listen",
            format!("`{}` is not an address:port ({e})", raw.listen),
        )
    })?;
    if raw.cookie.expose().len() < 16 {
        return Err(invalid(
            "cluster.cookie",
            "required when clustering: a shared secret of at least 16 characters",
        ));
    }
    if node_name.contains(char::is_whitespace) || node_name.len() > 128 {
        return Err(invalid(
            "cluster.node_name",
            "must be at most 128 characters without spaces",
        ));
    }
    for (key, value) in [
        ("cluster.heartbeat_interval_ms", raw.heartbeat_interval_ms),
        ("cluster.join_timeout_ms", raw.join_timeout_ms),
        ("cluster.call_timeout_ms", raw.call_timeout_ms),
        ("cluster.dns_refresh_secs", raw.dns_refresh_secs),
    ] {
        if value == 0 {
            return Err(invalid(key, "must be greater than 0"));
        }
    }
    if raw.heartbeat_timeout_ms < 2 * raw.heartbeat_interval_ms {
        return Err(invalid(
            "cluster.heartbeat_timeout_ms",
            "must be at least twice heartbeat_interval_ms",
        ));
    }
    if raw.vnodes == 0 || raw.vnodes > 4096 {
        return Err(invalid("cluster.vnodes", "must be within 1..=4096"));
    }
    let non_empty = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_owned());
    let tls_files = [
        ("cluster.tls_cert", non_empty(&raw.tls_cert)),
        ("cluster.tls_key", non_empty(&raw.tls_key)),
        ("cluster.tls_ca", non_empty(&raw.tls_ca)),
    ];
    let tls = match tls_files {
        [(_, None), (_, None), (_, None)] => None,
        [(_, Some(cert)), (_, Some(key)), (_, Some(ca))] => Some(chorus_cluster::ClusterTls {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
            ca: PathBuf::from(ca),
        }),
        partial => {
            let missing = partial
                .iter()
                .find(|(_, value)| value.is_none())
                .map_or("cluster.tls_cert", |(key, _)| key);
            return Err(invalid(
                missing,
                "mutual TLS between nodes needs all of cluster.tls_cert, cluster.tls_key and \
                 cluster.tls_ca (or none of them, for plain TCP)",
            ));
        }
    };
    Ok(Some(ClusterSettings {
        cluster: chorus_cluster::ClusterConfig {
            node_name: node_name.to_owned(),
            listen,
            advertise: non_empty(&raw.advertise),
            cookie: raw.cookie.expose().to_owned(),
            seeds: raw.seeds.iter().filter_map(|s| non_empty(s)).collect(),
            seed_dns: non_empty(&raw.seed_dns),
            dns_refresh: Duration::from_secs(raw.dns_refresh_secs),
            heartbeat_interval: Duration::from_millis(raw.heartbeat_interval_ms),
            heartbeat_timeout: Duration::from_millis(raw.heartbeat_timeout_ms),
            join_timeout: Duration::from_millis(raw.join_timeout_ms),
            call_timeout: Duration::from_millis(raw.call_timeout_ms),
            vnodes: raw.vnodes,
            tls,
        },
        leave_drain: Duration::from_millis(raw.leave_drain_ms),
        leave_deadline: Duration::from_secs(raw.leave_deadline_secs),
    }))
}

fn validate_documents(
    raw: &RawDocuments,
    data_dir: &Path,
) -> Result<DocumentsSettings, ConfigError> {
    use chorus_actors::blob::{BlobConfig, S3Config};
    use chorus_actors::indexer::chunk::ChunkParams;
    use chorus_actors::indexer::extract::ExtractConfig;

    let non_empty = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_owned());
    let blobs = match non_empty(&raw.s3_bucket) {
        None => BlobConfig::Local {
            root: non_empty(&raw.blob_root)
                .map(PathBuf::from)
                .unwrap_or_else(|| data_dir.join("blobs")),
        },
        Some(bucket) => {
            let region = non_empty(&raw.s3_region).ok_or_else(|| {
                invalid(
                    "documents.s3_region",
                    "must be set when documents.s3_bucket is",
                )
            })?;
            let access_key_id = non_empty(raw.s3_access_key_id.expose());
            let secret_access_key = non_empty(raw.s3_secret_access_key.expose());
            if access_key_id.is_some() != secret_access_key.is_some() {
                return Err(invalid(
                    "documents.s3_access_key_id",
                    "set both s3_access_key_id and s3_secret_access_key, or neither (then the \
                     AWS_* environment is used)",
                ));
            }
            let endpoint = non_empty(&raw.s3_endpoint);
            if let Some(endpoint) = &endpoint
                && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
            {
                return Err(invalid(
                    "documents.s3_endpoint",
                    format!("`{endpoint}` must start with http:// or https://"),
                ));
            }
            BlobConfig::S3(S3Config {
                bucket,
                endpoint,
                region,
                access_key_id,
                secret_access_key,
                path_style: raw.s3_path_style,
            })
        }
    };
    if !(1..=64).contains(&raw.ingest_concurrency) {
        return Err(invalid(
            "documents.ingest_concurrency",
            "must be within 1..=64",
        ));
    }
    if !(16..=8192).contains(&raw.chunk_target_tokens) {
        return Err(invalid(
            "documents.chunk_target_tokens",
            "must be within 16..=8192",
        ));
    }
    if raw.chunk_overlap_tokens * 2 > raw.chunk_target_tokens {
        return Err(invalid(
            "documents.chunk_overlap_tokens",
            "must be at most half of documents.chunk_target_tokens",
        ));
    }
    if raw.max_text_bytes == 0 {
        return Err(invalid(
            "documents.max_text_bytes",
            "must be greater than 0",
        ));
    }
    if raw.extract_timeout_secs == 0 {
        return Err(invalid(
            "documents.extract_timeout_secs",
            "must be greater than 0",
        ));
    }
    Ok(DocumentsSettings {
        blobs,
        indexer: chorus_actors::indexer::IndexerConfig {
            concurrency: raw.ingest_concurrency,
            chunk: ChunkParams {
                target_tokens: raw.chunk_target_tokens,
                overlap_tokens: raw.chunk_overlap_tokens,
            },
            extract: ExtractConfig {
                max_text_bytes: raw.max_text_bytes,
                timeout: Duration::from_secs(raw.extract_timeout_secs),
                tesseract: raw.ocr_tesseract.clone(),
                pdftoppm: raw.ocr_pdftoppm.clone(),
            },
            ..Default::default()
        },
    })
}

/// `[embeddings]`: the kind, its model, and a batch size the providers accept.
fn validate_embeddings(
    raw: &RawConfig,
    catalogue: &chorus_actors::provider::catalogue::CatalogueFile,
) -> Result<chorus_actors::indexer::embed::EmbeddingsConfig, ConfigError> {
    use chorus_actors::indexer::embed::{EmbedderKind, EmbeddingsConfig};
    let e = &raw.embeddings;
    if !(1..=2048).contains(&e.batch_size) {
        return Err(invalid("embeddings.batch_size", "must be within 1..=2048"));
    }
    let kind = match e.kind.as_str() {
        "none" => EmbedderKind::None,
        "local" => EmbedderKind::Local {
            model_dir: if e.local_model_dir.is_empty() {
                raw.data_dir.join("models").join("all-MiniLM-L6-v2")
            } else {
                PathBuf::from(&e.local_model_dir)
            },
        },
        "provider" => {
            let model = catalogue.models.iter().find(|m| m.id == e.provider_model);
            match model {
                Some(m) if m.capabilities.iter().any(|c| c == "embeddings") => {}
                Some(_) => {
                    return Err(invalid(
                        "embeddings.provider_model",
                        format!("`{}` has no `embeddings` capability", e.provider_model),
                    ));
                }
                None => {
                    return Err(invalid(
                        "embeddings.provider_model",
                        format!("`{}` is not a model of the catalogue", e.provider_model),
                    ));
                }
            }
            EmbedderKind::Provider {
                model: e.provider_model.clone(),
            }
        }
        other => {
            return Err(invalid(
                "embeddings.kind",
                format!("`{other}` is not one of: local, provider, none"),
            ));
        }
    };
    Ok(EmbeddingsConfig {
        kind,
        batch_size: e.batch_size,
    })
}

/// Parses the model catalogue: the built-in one, or `models_file` when set. Which providers are
/// enabled is decided later, from the environment, when the catalogue is built.
fn load_catalogue(
    models_file: &str,
) -> Result<chorus_actors::provider::catalogue::CatalogueFile, ConfigError> {
    let (text, origin) = if models_file.is_empty() {
        (
            DEFAULT_MODELS_TOML.to_owned(),
            "built-in config/models.toml".to_owned(),
        )
    } else {
        let text = std::fs::read_to_string(models_file).map_err(|source| ConfigError::Read {
            path: PathBuf::from(models_file),
            source,
        })?;
        (text, models_file.to_owned())
    };
    let table = parse_table(&text, &origin)?;
    serde_path_to_error::deserialize(Value::Table(table)).map_err(|err| {
        let path = err.path().to_string();
        ConfigError::Invalid {
            key: format!("{origin}: {path}"),
            message: err.into_inner().to_string(),
        }
    })
}

/// Parses and validates the tiers: the built-in `config/tiers.toml`, or `tiers_file` when set.
fn load_tiers(tiers_file: &str) -> Result<chorus_actors::quota::tiers::Tiers, ConfigError> {
    let (text, origin) = if tiers_file.is_empty() {
        (
            DEFAULT_TIERS_TOML.to_owned(),
            "built-in config/tiers.toml".to_owned(),
        )
    } else {
        let text = std::fs::read_to_string(tiers_file).map_err(|source| ConfigError::Read {
            path: PathBuf::from(tiers_file),
            source,
        })?;
        (text, tiers_file.to_owned())
    };
    let table = parse_table(&text, &origin)?;
    let file: chorus_actors::quota::tiers::TiersFile =
        serde_path_to_error::deserialize(Value::Table(table)).map_err(|err| {
            let path = err.path().to_string();
            ConfigError::Invalid {
                key: format!("{origin}: {path}"),
                message: err.into_inner().to_string(),
            }
        })?;
    chorus_actors::quota::tiers::Tiers::build(file).map_err(|e| ConfigError::Invalid {
        key: origin,
        message: e.to_string(),
    })
}

fn validate_auth(raw: &RawAuth) -> Result<AuthConfig, ConfigError> {
    let algorithm = match raw.jwt_algorithm.as_str() {
        "HS256" => JwtAlgorithm::Hs256,
        "RS256" => JwtAlgorithm::Rs256,
        "EdDSA" => JwtAlgorithm::EdDsa,
        other => {
            return Err(invalid(
                "auth.jwt_algorithm",
                format!("`{other}` is not one of: HS256, RS256, EdDSA"),
            ));
        }
    };
    let non_empty = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
    let private_key_file = non_empty(&raw.jwt_private_key_file);
    let public_key_file = non_empty(&raw.jwt_public_key_file);
    let secret = (!raw.jwt_secret.is_empty()).then(|| raw.jwt_secret.clone());
    match algorithm {
        JwtAlgorithm::Hs256 => {
            if let Some(secret) = &secret
                && secret.expose().len() < 32
            {
                return Err(invalid("auth.jwt_secret", "must be at least 32 bytes"));
            }
        }
        JwtAlgorithm::Rs256 | JwtAlgorithm::EdDsa => {
            if private_key_file.is_none() {
                return Err(invalid(
                    "auth.jwt_private_key_file",
                    format!(
                        "required when auth.jwt_algorithm = \"{}\"",
                        raw.jwt_algorithm
                    ),
                ));
            }
            if public_key_file.is_none() {
                return Err(invalid(
                    "auth.jwt_public_key_file",
                    format!(
                        "required when auth.jwt_algorithm = \"{}\"",
                        raw.jwt_algorithm
                    ),
                ));
            }
        }
    }
    if raw.jwt_kid.is_empty() {
        return Err(invalid("auth.jwt_kid", "must not be empty"));
    }
    if raw
        .jwt_previous_public_keys
        .iter()
        .any(|k| k.kid == raw.jwt_kid)
    {
        return Err(invalid(
            "auth.jwt_previous_public_keys",
            "a previous key reuses the current jwt_kid",
        ));
    }
    if raw.access_token_ttl_secs == 0 {
        return Err(invalid(
            "auth.access_token_ttl_secs",
            "must be greater than 0",
        ));
    }
    if raw.refresh_token_ttl_secs == 0 {
        return Err(invalid(
            "auth.refresh_token_ttl_secs",
            "must be greater than 0",
        ));
    }
    if !raw.provider_keys_secret.is_empty() && raw.provider_keys_secret.expose().len() < 32 {
        return Err(invalid(
            "auth.provider_keys_secret",
            "must be at least 32 bytes",
        ));
    }
    if raw.password_min_chars == 0 || raw.password_min_chars > raw.password_max_chars {
        return Err(invalid(
            "auth.password_min_chars",
            "must be at least 1 and at most auth.password_max_chars",
        ));
    }
    Ok(AuthConfig {
        algorithm,
        secret,
        kid: raw.jwt_kid.clone(),
        private_key_file,
        public_key_file,
        previous_public_keys: raw.jwt_previous_public_keys.clone(),
        issuer: raw.jwt_issuer.clone(),
        access_ttl: Duration::from_secs(raw.access_token_ttl_secs),
        refresh_ttl: Duration::from_secs(raw.refresh_token_ttl_secs),
        provider_keys_secret: (!raw.provider_keys_secret.is_empty())
            .then(|| raw.provider_keys_secret.clone()),
        password_min_chars: raw.password_min_chars,
        password_max_chars: raw.password_max_chars,
    })
}

fn parse_cors(origins: &[String]) -> Result<CorsOrigins, ConfigError> {
    if origins.is_empty() {
        return Ok(CorsOrigins::None);
    }
    if origins.iter().any(|o| o == "*") {
        if origins.len() > 1 {
            return Err(invalid(
                "server.cors_origins",
                "\"*\" cannot be combined with other origins",
            ));
        }
        return Ok(CorsOrigins::Any);
    }
    for origin in origins {
        let valid = (origin.starts_with("http://") || origin.starts_with("https://"))
            && !origin.ends_with('/')
            && origin
                .split("://")
                .nth(1)
                .is_some_and(|host| !host.is_empty() && !host.contains('/'));
        if !valid {
            return Err(invalid(
                "server.cors_origins",
                format!("`{origin}` is not an origin like https://app.example.com"),
            ));
        }
    }
    Ok(CorsOrigins::List(origins.to_vec()))
}

fn parse_table(text: &str, origin: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|e| ConfigError::Parse {
        origin: origin.to_owned(),
        message: e.to_string(),
    })
}

/// Overlays `overlay` onto `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut Table, overlay: Table) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(base_table)), Value::Table(overlay_table)) => {
                merge(base_table, overlay_table)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Applies `CHORUS__SECTION__KEY=value` variables. A value is read as the type the default has
/// at that key (so `CHORUS__AUTH__JWT_SECRET=123` stays a string); keys without a default are
/// read as a TOML literal when they parse as one, else as a string.
fn apply_env<I>(merged: &mut Table, defaults: &Table, env: I) -> Result<(), ConfigError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (var, raw_value) in vars {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var,
                message: "empty key segment (use CHORUS__SECTION__KEY)".into(),
            });
        }
        let default = lookup(defaults, &path);
        let value = typed_env_value(&raw_value, default).map_err(|message| ConfigError::Env {
            var: var.clone(),
            message,
        })?;
        insert_path(merged, &path, value).map_err(|message| ConfigError::Env {
            var: var.clone(),
            message,
        })?;
    }
    Ok(())
}

fn lookup<'a>(table: &'a Table, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let value = table.get(first)?;
    if rest.is_empty() {
        return Some(value);
    }
    match value {
        Value::Table(t) => lookup(t, rest),
        _ => None,
    }
}

fn parse_literal(raw: &str) -> Option<Value> {
    format!("v = {raw}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
}

fn typed_env_value(raw: &str, default: Option<&Value>) -> Result<Value, String> {
    match default {
        Some(Value::String(_)) => Ok(Value::String(raw.to_owned())),
        Some(Value::Integer(_)) => raw
            .trim()
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("`{raw}` is not an integer")),
        Some(Value::Float(_)) => raw
            .trim()
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| format!("`{raw}` is not a number")),
        Some(Value::Boolean(_)) => match raw.trim() {
            "true" | "1" => Ok(Value::Boolean(true)),
            "false" | "0" => Ok(Value::Boolean(false)),
            _ => Err(format!("`{raw}` is not a boolean (true/false)")),
        },
        Some(Value::Array(_)) => match parse_literal(raw) {
            Some(array @ Value::Array(_)) => Ok(array),
            // Comma-separated shorthand: CHORUS__SERVER__CORS_ORIGINS=https://a,https://b
            _ => Ok(Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_owned()))
                    .collect(),
            )),
        },
        Some(Value::Table(_)) => Err("names a section, not a key".into()),
        Some(Value::Datetime(_)) | None => {
            Ok(parse_literal(raw).unwrap_or_else(|| Value::String(raw.to_owned())))
        }
    }
}

fn insert_path(table: &mut Table, path: &[String], value: Value) -> Result<(), String> {
    let Some((first, rest)) = path.split_first() else {
        return Err("empty key".into());
    };
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return Ok(());
    }
    let entry = table
        .entry(first.clone())
        .or_insert_with(|| Value::Table(Table::new()));
    match entry {
        Value::Table(inner) => insert_path(inner, rest, value),
        _ => Err(format!("`{first}` is a key, not a section")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn error_text(result: Result<Config, ConfigError>) -> String {
        match result {
            Ok(_) => panic!("expected a config error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_load_and_match_the_documented_values() {
        let config = Config::load(None, env(&[])).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert_eq!(config.server.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(config.auth.algorithm, JwtAlgorithm::Hs256);
        assert!(config.auth.secret.is_none());
        assert!(
            matches!(config.store, StoreConfig::Sqlite { ref path } if path == &PathBuf::from("./data/chorus.db"))
        );
        assert_eq!(config.server.cors, CorsOrigins::None);
    }

    #[test]
    fn file_then_env_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "data_dir = \"/srv/a\"\n[server]\nbind = \"0.0.0.0:1\"\n",
        )
        .unwrap();
        let config = Config::load(
            Some(&file),
            env(&[
                ("CHORUS__SERVER__BIND", "127.0.0.1:9000"),
                (
                    "CHORUS__AUTH__JWT_SECRET",
                    "12345678901234567890123456789012",
                ),
                (
                    "CHORUS__SERVER__CORS_ORIGINS",
                    "https://a.example,https://b.example",
                ),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/srv/a"));
        assert_eq!(config.server.bind.to_string(), "127.0.0.1:9000");
        // A numeric-looking secret stays a string because the default is a string.
        assert_eq!(
            config.auth.secret.as_ref().map(Secret::expose),
            Some("12345678901234567890123456789012")
        );
        assert_eq!(
            config.server.cors,
            CorsOrigins::List(vec!["https://a.example".into(), "https://b.example".into()])
        );
    }

    #[test]
    fn embeddings_default_to_the_local_model_under_the_data_dir() {
        use chorus_actors::indexer::embed::EmbedderKind;
        let config = Config::load(None, env(&[])).unwrap();
        assert_eq!(
            config.embeddings.kind,
            EmbedderKind::Local {
                model_dir: PathBuf::from("./data/models/all-MiniLM-L6-v2")
            }
        );
        assert_eq!(config.embeddings.batch_size, 32);
        let config = Config::load(
            None,
            env(&[
                ("CHORUS__EMBEDDINGS__KIND", "provider"),
                (
                    "CHORUS__EMBEDDINGS__PROVIDER_MODEL",
                    "text-embedding-3-small",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(
            config.embeddings.kind,
            EmbedderKind::Provider {
                model: "text-embedding-3-small".into()
            }
        );
        for (key, value, named) in [
            ("CHORUS__EMBEDDINGS__KIND", "magic", "embeddings.kind"),
            (
                "CHORUS__EMBEDDINGS__BATCH_SIZE",
                "0",
                "embeddings.batch_size",
            ),
        ] {
            let text = error_text(Config::load(None, env(&[(key, value)])));
            assert!(text.contains(named), "{text}");
        }
        for model in ["nope", "mock-lorem"] {
            let text = error_text(Config::load(
                None,
                env(&[
                    ("CHORUS__EMBEDDINGS__KIND", "provider"),
                    ("CHORUS__EMBEDDINGS__PROVIDER_MODEL", model),
                ]),
            ));
            assert!(text.contains("embeddings.provider_model"), "{text}");
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = error_text(Config::load(None, env(&[("CHORUS__SERVER__BINDD", "x")])));
        assert!(text.contains("server"), "{text}");
        assert!(text.contains("bindd"), "{text}");
        let text = error_text(Config::load(None, env(&[("CHORUS__NOPE__X", "1")])));
        assert!(text.contains("nope"), "{text}");
    }

    #[test]
    fn bad_values_are_named() {
        let text = error_text(Config::load(
            None,
            env(&[("CHORUS__SERVER__BIND", "nowhere")]),
        ));
        assert!(text.contains("server.bind"), "{text}");
        let text = error_text(Config::load(
            None,
            env(&[("CHORUS__SERVER__BODY_LIMIT_BYTES", "lots")]),
        ));
        assert!(text.contains("CHORUS__SERVER__BODY_LIMIT_BYTES"), "{text}");
        let text = error_text(Config::load(
            None,
            env(&[("CHORUS__STORE__KIND", "oracle")]),
        ));
        assert!(text.contains("store.kind"), "{text}");
        let text = error_text(Config::load(
            None,
            env(&[("CHORUS__AUTH__JWT_SECRET", "short")]),
        ));
        assert!(text.contains("auth.jwt_secret"), "{text}");
        let text = error_text(Config::load(
            None,
            env(&[("CHORUS__AUTH__JWT_ALGORITHM", "RS256")]),
        ));
        assert!(text.contains("auth.jwt_private_key_file"), "{text}");
    }

    #[test]
    fn file_type_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[limits]\napi_keys_per_user = \"many\"\n").unwrap();
        let text = error_text(Config::load(Some(&file), env(&[])));
        assert!(text.contains("limits.api_keys_per_user"), "{text}");
    }

    #[test]
    fn metrics_basic_auth_needs_both_halves() {
        let config = Config::load(None, env(&[])).unwrap();
        assert!(config.metrics.basic_auth.is_none());
        let config = Config::load(
            None,
            env(&[
                ("CHORUS__METRICS__BASIC_AUTH_USER", "prom"),
                ("CHORUS__METRICS__BASIC_AUTH_PASSWORD", "scrape-secret"),
            ]),
        )
        .unwrap();
        let auth = config.metrics.basic_auth.as_ref().unwrap();
        assert_eq!(
            (auth.user.as_str(), auth.password.expose()),
            ("prom", "scrape-secret")
        );
        assert!(!config.to_redacted_toml().unwrap().contains("scrape-secret"));
        let text = error_text(Config::load(
            None,
            env(&[("CHORUS__METRICS__BASIC_AUTH_USER", "prom")]),
        ));
        assert!(text.contains("metrics.basic_auth_password"), "{text}");
        let text = error_text(Config::load(
            None,
            env(&[("CHORUS__METRICS__BASIC_AUTH_PASSWORD", "x")]),
        ));
        assert!(text.contains("metrics.basic_auth_user"), "{text}");
    }

    #[test]
    fn documents_default_to_local_blobs_under_the_data_dir() {
        use chorus_actors::blob::BlobConfig;
        let config = Config::load(None, env(&[("CHORUS__DATA_DIR", "/srv/x")])).unwrap();
        assert_eq!(
            config.documents.blobs,
            BlobConfig::Local {
                root: PathBuf::from("/srv/x/blobs")
            }
        );
        let indexer = &config.documents.indexer;
        assert_eq!(indexer.concurrency, 2);
        assert_eq!(indexer.chunk.target_tokens, 400);
        assert_eq!(indexer.chunk.overlap_tokens, 60);
        assert!(indexer.embedder.is_none());
    }

    #[test]
    fn documents_use_s3_when_a_bucket_is_set() {
        use chorus_actors::blob::BlobConfig;
        let config = Config::load(
            None,
            env(&[
                ("CHORUS__DOCUMENTS__S3_BUCKET", "chorus-docs"),
                ("CHORUS__DOCUMENTS__S3_ENDPOINT", "http://127.0.0.1:9000"),
                ("CHORUS__DOCUMENTS__S3_ACCESS_KEY_ID", "minio"),
                (
                    "CHORUS__DOCUMENTS__S3_SECRET_ACCESS_KEY",
                    "minio-secret-key",
                ),
            ]),
        )
        .unwrap();
        let BlobConfig::S3(s3) = &config.documents.blobs else {
            panic!("expected S3: {:?}", config.documents.blobs);
        };
        assert_eq!(s3.bucket, "chorus-docs");
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.region, "us-east-1");
        assert!(s3.path_style);
        let printed = config.to_redacted_toml().unwrap();
        assert!(!printed.contains("minio-secret-key"), "{printed}");
        assert!(!format!("{config:?}").contains("minio-secret-key"));

        let half = Config::load(
            None,
            env(&[
                ("CHORUS__DOCUMENTS__S3_BUCKET", "b"),
                ("CHORUS__DOCUMENTS__S3_ACCESS_KEY_ID", "minio"),
            ]),
        );
        assert!(error_text(half).contains("documents.s3_access_key_id"));
        let overlap = Config::load(
            None,
            env(&[("CHORUS__DOCUMENTS__CHUNK_OVERLAP_TOKENS", "300")]),
        );
        assert!(error_text(overlap).contains("documents.chunk_overlap_tokens"));
    }

    #[test]
    fn cluster_tls_takes_all_three_files_or_none() {
        let clustered = [
            ("CHORUS__CLUSTER__LISTEN", "127.0.0.1:7946"),
            ("CHORUS__CLUSTER__COOKIE", "a-cookie-of-16-chars+"),
        ];
        let config = Config::load(None, env(&clustered)).unwrap();
        assert_eq!(config.cluster.as_ref().unwrap().cluster.tls, None);
        let mut all = clustered.to_vec();
        all.extend([
            ("CHORUS__CLUSTER__TLS_CERT", "/etc/chorus/node.crt"),
            ("CHORUS__CLUSTER__TLS_KEY", "/etc/chorus/node.key"),
            ("CHORUS__CLUSTER__TLS_CA", "/etc/chorus/ca.crt"),
        ]);
        let config = Config::load(None, env(&all)).unwrap();
        let cluster = &config.cluster.as_ref().unwrap().cluster;
        assert_eq!(
            cluster.tls,
            Some(chorus_cluster::ClusterTls {
                cert: "/etc/chorus/node.crt".into(),
                key: "/etc/chorus/node.key".into(),
                ca: "/etc/chorus/ca.crt".into(),
            })
        );
        let printed = format!("{cluster:?}");
        assert!(printed.contains("/etc/chorus/node.key"), "{printed}");
        assert!(!printed.contains("a-cookie-of-16-chars+"), "{printed}");

        let mut no_ca = all.clone();
        no_ca.retain(|(k, _)| *k != "CHORUS__CLUSTER__TLS_CA");
        let text = error_text(Config::load(None, env(&no_ca)));
        assert!(text.contains("`cluster.tls_ca`"), "{text}");
        let mut cert_only = clustered.to_vec();
        cert_only.push(("CHORUS__CLUSTER__TLS_CERT", "/etc/chorus/node.crt"));
        let text = error_text(Config::load(None, env(&cert_only)));
        assert!(text.contains("`cluster.tls_key`"), "{text}");
    }

    #[test]
    fn redacted_output_hides_the_secret() {
        let config = Config::load(
            None,
            env(&[(
                "CHORUS__AUTH__JWT_SECRET",
                "a-very-secret-value-of-32-bytes!!",
            )]),
        )
        .unwrap();
        let printed = config.to_redacted_toml().unwrap();
        assert!(!printed.contains("a-very-secret"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
        assert!(!format!("{config:?}").contains("a-very-secret"));
    }
}
