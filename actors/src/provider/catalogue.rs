//! The model catalogue (`config/models.toml`): which providers are reachable and which models
//! users may pick, with context length and pricing. Built once at start from the parsed file and
//! the environment; models of providers without a key are left out.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Provider;
use super::anthropic::AnthropicProvider;
use super::gemini::GeminiProvider;
use super::http::{HttpClient, HttpTimeouts};
use super::mock::MockProvider;
use super::openai::OpenAiProvider;
use super::pool::{Deployment, DeploymentConfig, PoolState, Pools, RoutingPolicy};
use crate::quota::TokenBuckets;

/// `[providers.<id>]` in models.toml.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    /// Wire format: `openai`, `anthropic`, `gemini` or `mock`.
    pub kind: String,
    #[serde(default)]
    pub base_url: Option<String>,
    /// Environment variable holding the key; the provider is on when it is set and non-empty.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Environment variable overriding `base_url`.
    #[serde(default)]
    pub base_url_env: Option<String>,
    /// For keyless providers: on when this variable is set.
    #[serde(default)]
    pub enabled_by_env: Option<String>,
}

/// `[[models]]` in models.toml.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub id: String,
    pub name: String,
    pub provider: String,
    pub upstream: String,
    pub context_length: u32,
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub capabilities: Vec<String>,
    pub tiers: Vec<String>,
    pub max_output_tokens: u32,
    /// Ways to reach this model. Empty: one deployment, `provider` with `upstream`.
    #[serde(default)]
    pub deployments: Vec<DeploymentSpec>,
    /// Models tried, in order, when every deployment of this one fails before output.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Models tried, in order, when the prompt is too long for this one.
    #[serde(default)]
    pub context_fallbacks: Vec<String>,
    /// Whether a stream cut after output continues on another deployment or fallback, with the
    /// partial answer as prefix. Unset: `routing.continue_after_cut`.
    #[serde(default)]
    pub continue_after_cut: Option<bool>,
}

/// `[[models.deployments]]`: one way to reach a model.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// Unique across the file. Default: `<model id>@<provider>` (with `#n` for repeats).
    #[serde(default)]
    pub id: Option<String>,
    /// A provider of `[providers]`; the deployment is on when that provider is.
    pub provider: String,
    /// The provider's model name. Default: the model's `upstream`.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Another endpoint of the same wire format (a second region, a proxy).
    #[serde(default)]
    pub base_url: Option<String>,
    /// Another key (environment variable); the deployment is off when it is unset.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Share of traffic among deployments of the same priority.
    #[serde(default = "one")]
    pub weight: u32,
    /// Lower first: priority 1 serves only when no priority-0 deployment is available.
    #[serde(default)]
    pub priority: u32,
    /// Requests and tokens per minute this deployment may take (the provider's limits).
    #[serde(default)]
    pub rpm: Option<u64>,
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Deadline for the first token; unset: `turns.first_token_timeout_secs`.
    #[serde(default)]
    pub first_token_timeout_ms: Option<u64>,
    /// Deadline for the whole call; unset: none beyond the gaps between chunks.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CatalogueFile {
    pub providers: BTreeMap<String, ProviderSpec>,
    pub models: Vec<ModelSpec>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CatalogueError {
    #[error("models.toml: model `{model}` names unknown provider `{provider}`")]
    UnknownProvider { model: String, provider: String },
    #[error(
        "models.toml: provider `{provider}` has unknown kind `{kind}` (openai, anthropic, gemini, mock)"
    )]
    UnknownKind { provider: String, kind: String },
    #[error("models.toml: provider `{0}` needs a base_url")]
    MissingBaseUrl(String),
    #[error("models.toml: model id `{0}` appears twice")]
    DuplicateModel(String),
    #[error("models.toml: model `{model}`: {message}")]
    InvalidModel { model: String, message: String },
    #[error("models.toml: deployment id `{0}` appears twice")]
    DuplicateDeployment(String),
}

/// A usable model: its spec, its enabled deployments, and the first of them as the default
/// route for calls that need no failover (titles, embeddings).
#[derive(Clone)]
pub struct Model {
    /// Shared: a model is cloned several times per request (routing, usage), so a clone is a few
    /// reference counts, not a copy of every field.
    pub spec: Arc<ModelSpec>,
    /// The provider id of the first enabled deployment (`openai`, `groq`, …).
    pub provider_id: Arc<str>,
    pub provider: Arc<dyn Provider>,
    /// Enabled deployments, in file order.
    pub deployments: Vec<Arc<Deployment>>,
    /// OpenAI's tokenizer for this model, resolved once (`None`: counted by estimate).
    pub tokenizer: Option<&'static tiktoken_rs::CoreBPE>,
}

impl Model {
    pub fn is_mock(&self) -> bool {
        self.provider.kind() == "mock"
    }

    /// Cost in USD of a call with these token counts.
    pub fn cost_usd(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.spec.input_per_mtok
            + output_tokens as f64 * self.spec.output_per_mtok)
            / 1_000_000.0
    }

    pub fn can(&self, capability: &str) -> bool {
        self.spec.capabilities.iter().any(|c| c == capability)
    }
}

/// The enabled models, in file order, by id, and the provider pools serving them.
#[derive(Clone)]
pub struct Catalogue {
    models: Vec<Model>,
    by_id: HashMap<String, usize>,
    pools: Arc<Pools>,
    http: HttpClient,
    /// Wire format and endpoint by provider id, for calls with a user's own key.
    endpoints: HashMap<String, (String, Option<String>)>,
}

/// Timeouts of the shared HTTP client: connecting, and the longest silence while reading a
/// response. Turns enforce their own, tighter deadlines; this bounds every other call (titles,
/// summaries, non-streaming `/v1`) so a hung provider cannot hold one forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(120);

impl Catalogue {
    /// Builds the catalogue from the file and an environment lookup (injected, for tests).
    pub fn build(
        file: &CatalogueFile,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Catalogue, CatalogueError> {
        Self::build_with(file, env, RoutingPolicy::default(), None)
    }

    /// Builds the catalogue and its pools with the routing policy and the buckets that hold
    /// per-deployment limits (`None`: deployments' rpm/tpm are not enforced).
    pub fn build_with(
        file: &CatalogueFile,
        env: &dyn Fn(&str) -> Option<String>,
        policy: RoutingPolicy,
        buckets: Option<Arc<dyn TokenBuckets>>,
    ) -> Result<Catalogue, CatalogueError> {
        let http = HttpClient::new(HttpTimeouts {
            connect: CONNECT_TIMEOUT,
            read: READ_TIMEOUT,
        })
        .map_err(|e| CatalogueError::InvalidModel {
            model: "(http client)".into(),
            message: e.to_string(),
        })?;
        let set = |name: &Option<String>| {
            name.as_deref()
                .and_then(env)
                .filter(|v| !v.trim().is_empty())
        };
        // Enabled providers: id → (kind, base URL, key).
        let mut enabled: HashMap<String, (String, Option<String>, String)> = HashMap::new();
        for (id, spec) in &file.providers {
            if !matches!(
                spec.kind.as_str(),
                "mock" | "openai" | "anthropic" | "gemini"
            ) {
                return Err(CatalogueError::UnknownKind {
                    provider: id.clone(),
                    kind: spec.kind.clone(),
                });
            }
            let key = set(&spec.api_key_env);
            let on = match spec.kind.as_str() {
                "mock" => true,
                _ if spec.enabled_by_env.is_some() => set(&spec.enabled_by_env).is_some(),
                _ => key.is_some(),
            };
            let base_url = set(&spec.base_url_env)
                .or_else(|| spec.base_url.clone())
                .map(|u| u.trim_end_matches('/').to_owned());
            if spec.kind != "mock" && base_url.is_none() {
                return Err(CatalogueError::MissingBaseUrl(id.clone()));
            }
            if on {
                enabled.insert(
                    id.clone(),
                    (spec.kind.clone(), base_url, key.unwrap_or_default()),
                );
            }
        }
        let endpoints = enabled
            .iter()
            .map(|(id, (kind, base_url, _))| (id.clone(), (kind.clone(), base_url.clone())))
            .collect();

        let mut models = Vec::new();
        let mut by_id = HashMap::new();
        let mut deployment_ids = std::collections::HashSet::new();
        let mut by_provider: BTreeMap<String, Vec<Arc<Deployment>>> = BTreeMap::new();
        for spec in &file.models {
            if !file.providers.contains_key(&spec.provider) {
                return Err(CatalogueError::UnknownProvider {
                    model: spec.id.clone(),
                    provider: spec.provider.clone(),
                });
            }
            if spec.id.trim().is_empty() || spec.upstream.trim().is_empty() {
                return Err(CatalogueError::InvalidModel {
                    model: spec.id.clone(),
                    message: "id and upstream must not be empty".into(),
                });
            }
            if spec.input_per_mtok < 0.0 || spec.output_per_mtok < 0.0 {
                return Err(CatalogueError::InvalidModel {
                    model: spec.id.clone(),
                    message: "prices must not be negative".into(),
                });
            }
            if file.models.iter().filter(|m| m.id == spec.id).count() > 1 {
                return Err(CatalogueError::DuplicateModel(spec.id.clone()));
            }
            for fallback in spec.fallbacks.iter().chain(&spec.context_fallbacks) {
                if fallback == &spec.id || !file.models.iter().any(|m| &m.id == fallback) {
                    return Err(CatalogueError::InvalidModel {
                        model: spec.id.clone(),
                        message: format!("fallback `{fallback}` is not another model of this file"),
                    });
                }
            }
            let implicit = [DeploymentSpec {
                id: None,
                provider: spec.provider.clone(),
                upstream: None,
                base_url: None,
                api_key_env: None,
                weight: 1,
                priority: 0,
                rpm: None,
                tpm: None,
                first_token_timeout_ms: None,
                timeout_ms: None,
            }];
            let specs: &[DeploymentSpec] = if spec.deployments.is_empty() {
                &implicit
            } else {
                &spec.deployments
            };
            let mut deployments = Vec::new();
            for (n, d) in specs.iter().enumerate() {
                if !file.providers.contains_key(&d.provider) {
                    return Err(CatalogueError::UnknownProvider {
                        model: spec.id.clone(),
                        provider: d.provider.clone(),
                    });
                }
                let id = d.id.clone().unwrap_or_else(|| {
                    let base = format!("{}@{}", spec.id, d.provider);
                    if specs[..n]
                        .iter()
                        .any(|p| p.id.is_none() && p.provider == d.provider)
                    {
                        format!("{base}#{}", n + 1)
                    } else {
                        base
                    }
                });
                if !deployment_ids.insert(id.clone()) {
                    return Err(CatalogueError::DuplicateDeployment(id));
                }
                if d.weight == 0 {
                    return Err(CatalogueError::InvalidModel {
                        model: spec.id.clone(),
                        message: format!("deployment `{id}`: weight must be at least 1"),
                    });
                }
                let Some((kind, base_url, key)) = enabled.get(&d.provider) else {
                    continue;
                };
                let key = match &d.api_key_env {
                    Some(var) => match set(&Some(var.clone())) {
                        Some(key) => key,
                        None => continue,
                    },
                    None => key.clone(),
                };
                let base_url = d
                    .base_url
                    .clone()
                    .map(|u| u.trim_end_matches('/').to_owned())
                    .or_else(|| base_url.clone());
                let provider = make_provider(kind, base_url, key, &http);
                let deployment = Arc::new(Deployment::new(
                    DeploymentConfig {
                        id,
                        provider_id: d.provider.clone(),
                        upstream: d.upstream.clone().unwrap_or_else(|| spec.upstream.clone()),
                        weight: d.weight,
                        priority: d.priority,
                        rpm: d.rpm.filter(|n| *n > 0),
                        tpm: d.tpm.filter(|n| *n > 0),
                        first_token_timeout: d.first_token_timeout_ms.map(Duration::from_millis),
                        timeout: d.timeout_ms.map(Duration::from_millis),
                    },
                    provider,
                ));
                by_provider
                    .entry(d.provider.clone())
                    .or_default()
                    .push(deployment.clone());
                deployments.push(deployment);
            }
            let Some(first) = deployments.first() else {
                continue;
            };
            by_id.insert(spec.id.clone(), models.len());
            // Looked up once here: a failed lookup per request costs an error (and, with
            // RUST_BACKTRACE set, a backtrace) on the hot path.
            let tokenizer = (first.config.provider_id == "openai")
                .then(|| tiktoken_rs::bpe_for_model(&spec.upstream).ok())
                .flatten();
            models.push(Model {
                spec: Arc::new(spec.clone()),
                provider_id: Arc::from(first.config.provider_id.as_str()),
                provider: first.provider.clone(),
                deployments,
                tokenizer,
            });
        }
        let pools = by_provider
            .into_iter()
            .map(|(provider_id, deployments)| {
                Arc::new(PoolState {
                    provider_id,
                    deployments,
                })
            })
            .collect();
        Ok(Catalogue {
            models,
            by_id,
            pools: Arc::new(Pools::new(pools, buckets, policy)),
            http,
            endpoints,
        })
    }

    pub fn pools(&self) -> &Arc<Pools> {
        &self.pools
    }

    /// The provider of a deployment, called with a user's own key instead of the shared one.
    pub fn provider_with_key(
        &self,
        deployment: &Deployment,
        key: String,
    ) -> Option<Arc<dyn Provider>> {
        let (kind, base_url) = self.endpoints.get(&deployment.config.provider_id)?;
        if kind == "mock" {
            return None;
        }
        Some(make_provider(kind, base_url.clone(), key, &self.http))
    }

    pub fn get(&self, id: &str) -> Option<&Model> {
        self.by_id.get(id).map(|&i| &self.models[i])
    }

    pub fn models(&self) -> &[Model] {
        &self.models
    }

    /// The first enabled chat model: the default when neither the request, the thread nor the
    /// user names one.
    pub fn default_chat_model(&self) -> Option<&Model> {
        self.models.iter().find(|m| m.can("chat"))
    }
}

/// An adapter for a wire format. `kind` was checked when the providers were read.
fn make_provider(
    kind: &str,
    base_url: Option<String>,
    key: String,
    http: &HttpClient,
) -> Arc<dyn Provider> {
    let base_url = base_url.unwrap_or_default();
    match kind {
        "openai" => Arc::new(OpenAiProvider::new(base_url, key, http.clone())),
        "anthropic" => Arc::new(AnthropicProvider::new(base_url, key, http.clone())),
        "gemini" => Arc::new(GeminiProvider::new(base_url, key, http.clone())),
        _ => Arc::new(MockProvider),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = include_str!("../../../config/models.toml");

    fn file() -> CatalogueFile {
        // The actors crate has no TOML parser; the file is JSON-shaped through serde_json only in
        // the edge. Here we build an equivalent value by hand for the few fields tests need.
        let _ = FILE;
        CatalogueFile {
            providers: [
                (
                    "mock".to_owned(),
                    ProviderSpec {
                        kind: "mock".into(),
                        base_url: None,
                        api_key_env: None,
                        base_url_env: None,
                        enabled_by_env: None,
                    },
                ),
                (
                    "openai".to_owned(),
                    ProviderSpec {
                        kind: "openai".into(),
                        base_url: Some("https://api.openai.com/v1".into()),
                        api_key_env: Some("OPENAI_API_KEY".into()),
                        base_url_env: Some("OPENAI_BASE_URL".into()),
                        enabled_by_env: None,
                    },
                ),
            ]
            .into_iter()
            .collect(),
            models: vec![model("mock-echo", "mock"), model("gpt-4o", "openai")],
        }
    }

    fn model(id: &str, provider: &str) -> ModelSpec {
        ModelSpec {
            id: id.into(),
            name: id.into(),
            provider: provider.into(),
            upstream: "echo".into(),
            context_length: 8192,
            input_per_mtok: 2.0,
            output_per_mtok: 8.0,
            capabilities: vec!["chat".into()],
            tiers: vec!["free".into()],
            max_output_tokens: 512,
            deployments: Vec::new(),
            fallbacks: Vec::new(),
            context_fallbacks: Vec::new(),
            continue_after_cut: None,
        }
    }

    #[test]
    fn providers_without_keys_are_off_and_mock_is_always_on() {
        let catalogue = Catalogue::build(&file(), &|_| None).unwrap();
        assert!(catalogue.get("mock-echo").is_some());
        assert!(catalogue.get("gpt-4o").is_none());
        let with_key = Catalogue::build(&file(), &|name| {
            (name == "OPENAI_API_KEY").then(|| "sk-x".to_owned())
        })
        .unwrap();
        let gpt = with_key.get("gpt-4o").unwrap();
        assert_eq!(&*gpt.provider_id, "openai");
        assert!(
            gpt.tokenizer.is_none(),
            "upstream `echo` is no OpenAI model"
        );
        assert!((gpt.cost_usd(1_000_000, 500_000) - 6.0).abs() < 1e-9);
    }

    #[test]
    fn bad_files_are_errors() {
        let mut bad = file();
        bad.models.push(model("x", "nowhere"));
        assert!(matches!(
            Catalogue::build(&bad, &|_| None),
            Err(CatalogueError::UnknownProvider { .. })
        ));
        let mut dup = file();
        dup.models.push(model("mock-echo", "mock"));
        assert!(matches!(
            Catalogue::build(&dup, &|_| None),
            Err(CatalogueError::DuplicateModel(_))
        ));
    }
}
