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
use super::mock::MockProvider;
use super::openai::OpenAiProvider;

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
}

/// A usable model: its spec plus the provider that serves it.
#[derive(Clone)]
pub struct Model {
    pub spec: ModelSpec,
    /// The provider's id in models.toml (`openai`, `groq`, …) — what messages record.
    pub provider_id: String,
    pub provider: Arc<dyn Provider>,
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

/// The enabled models, in file order, by id.
#[derive(Clone, Default)]
pub struct Catalogue {
    models: Vec<Model>,
    by_id: HashMap<String, usize>,
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
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| CatalogueError::InvalidModel {
                model: "(http client)".into(),
                message: e.to_string(),
            })?;
        let set = |name: &Option<String>| {
            name.as_deref()
                .and_then(env)
                .filter(|v| !v.trim().is_empty())
        };
        let mut providers: HashMap<String, Arc<dyn Provider>> = HashMap::new();
        for (id, spec) in &file.providers {
            let key = set(&spec.api_key_env);
            let enabled = match spec.kind.as_str() {
                "mock" => true,
                _ if spec.enabled_by_env.is_some() => set(&spec.enabled_by_env).is_some(),
                _ => key.is_some(),
            };
            let base_url = set(&spec.base_url_env)
                .or_else(|| spec.base_url.clone())
                .map(|u| u.trim_end_matches('/').to_owned());
            let key = key.unwrap_or_default();
            let provider: Arc<dyn Provider> = match spec.kind.as_str() {
                "mock" => Arc::new(MockProvider),
                kind @ ("openai" | "anthropic" | "gemini") => {
                    let Some(base_url) = base_url else {
                        return Err(CatalogueError::MissingBaseUrl(id.clone()));
                    };
                    match kind {
                        "openai" => Arc::new(OpenAiProvider::new(base_url, key, http.clone())),
                        "anthropic" => {
                            Arc::new(AnthropicProvider::new(base_url, key, http.clone()))
                        }
                        _ => Arc::new(GeminiProvider::new(base_url, key, http.clone())),
                    }
                }
                other => {
                    return Err(CatalogueError::UnknownKind {
                        provider: id.clone(),
                        kind: other.to_owned(),
                    });
                }
            };
            if enabled {
                providers.insert(id.clone(), provider);
            }
        }
        let mut catalogue = Catalogue::default();
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
            if catalogue.by_id.contains_key(&spec.id)
                || file.models.iter().filter(|m| m.id == spec.id).count() > 1
            {
                return Err(CatalogueError::DuplicateModel(spec.id.clone()));
            }
            if let Some(provider) = providers.get(&spec.provider) {
                catalogue
                    .by_id
                    .insert(spec.id.clone(), catalogue.models.len());
                catalogue.models.push(Model {
                    spec: spec.clone(),
                    provider_id: spec.provider.clone(),
                    provider: provider.clone(),
                });
            }
        }
        Ok(catalogue)
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
        assert_eq!(gpt.provider_id, "openai");
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
