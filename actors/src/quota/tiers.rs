//! Tiers (`config/tiers.toml`): per-minute buckets, monthly limits and allowed models per plan.
//!
//! The edge parses the TOML into [`TiersFile`]; [`Tiers::build`] validates it once at start.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `[tiers.<id>.monthly]`: limits per calendar month (UTC); `None` is unlimited.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MonthlyLimits {
    #[serde(default)]
    pub chat_messages: Option<u64>,
    #[serde(default)]
    pub tokens: Option<u64>,
    #[serde(default)]
    pub images: Option<u64>,
    #[serde(default)]
    pub web_searches: Option<u64>,
    #[serde(default)]
    pub rag_queries: Option<u64>,
}

impl MonthlyLimits {
    /// `(usage counter kind, limit)` pairs, named as the `usage` table and `/me/usage` name them.
    pub fn entries(&self) -> [(&'static str, Option<u64>); 5] {
        [
            ("chat_messages", self.chat_messages),
            ("tokens", self.tokens),
            ("images", self.images),
            ("web_searches", self.web_searches),
            ("rag_queries", self.rag_queries),
        ]
    }
}

/// `[tiers.<id>]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    pub name: String,
    pub requests_per_minute: u32,
    pub tokens_per_minute: u64,
    /// Model ids, or `"*"` for every model whose catalogue entry allows this tier.
    pub models: Vec<String>,
    pub files_per_request: u32,
    pub upload_max_bytes: u64,
    #[serde(default)]
    pub monthly: MonthlyLimits,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TiersFile {
    pub default_tier: String,
    pub tiers: BTreeMap<String, TierSpec>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TiersError {
    #[error("tiers.toml: default_tier `{0}` is not a tier")]
    UnknownDefault(String),
    #[error("tiers.toml: no tiers defined")]
    Empty,
    #[error("tiers.toml: tier `{tier}`: {message}")]
    Invalid { tier: String, message: String },
}

/// The validated tiers.
#[derive(Debug, Clone)]
pub struct Tiers {
    file: TiersFile,
}

impl Tiers {
    pub fn build(file: TiersFile) -> Result<Tiers, TiersError> {
        if file.tiers.is_empty() {
            return Err(TiersError::Empty);
        }
        if !file.tiers.contains_key(&file.default_tier) {
            return Err(TiersError::UnknownDefault(file.default_tier.clone()));
        }
        for (id, tier) in &file.tiers {
            let invalid = |message: &str| TiersError::Invalid {
                tier: id.clone(),
                message: message.to_owned(),
            };
            if id.trim().is_empty()
                || id
                    .chars()
                    .any(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            {
                return Err(invalid("ids use letters, digits, `-` and `_`"));
            }
            if tier.requests_per_minute == 0 || tier.tokens_per_minute == 0 {
                return Err(invalid(
                    "requests_per_minute and tokens_per_minute must be > 0",
                ));
            }
            if tier.models.is_empty() {
                return Err(invalid("models must name at least one model or \"*\""));
            }
        }
        Ok(Tiers { file })
    }

    /// One default tier, `free`, with no practical limit and every model: what a session layer
    /// built without a tiers file (tests, embedding) enforces.
    pub fn unlimited() -> Tiers {
        let free = TierSpec {
            name: "Unlimited".into(),
            requests_per_minute: u32::MAX,
            tokens_per_minute: u64::from(u32::MAX),
            models: vec!["*".into()],
            files_per_request: u32::MAX,
            upload_max_bytes: u64::MAX,
            monthly: MonthlyLimits::default(),
        };
        Tiers {
            file: TiersFile {
                default_tier: "free".into(),
                tiers: [("free".to_owned(), free)].into_iter().collect(),
            },
        }
    }

    pub fn default_tier(&self) -> &str {
        &self.file.default_tier
    }

    /// The tier's spec; an unknown tier (e.g. removed from the file while users still have it)
    /// falls back to the default tier, so no user is left without limits.
    pub fn get(&self, id: &str) -> (&str, &TierSpec) {
        match self.file.tiers.get_key_value(id) {
            Some((id, spec)) => (id, spec),
            None => {
                let id = self.default_tier();
                // `build` checked the default exists.
                let spec = &self.file.tiers[id];
                (id, spec)
            }
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.file.tiers.contains_key(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.file.tiers.keys().map(String::as_str)
    }

    /// Whether `tier` may use the model `model_id`, whose catalogue entry allows `model_tiers`.
    pub fn allows_model(&self, tier: &str, model_id: &str, model_tiers: &[String]) -> bool {
        let (tier_id, spec) = self.get(tier);
        model_tiers.iter().any(|t| t == tier_id)
            && spec.models.iter().any(|m| m == "*" || m == model_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(models: &[&str]) -> TierSpec {
        TierSpec {
            name: "T".into(),
            requests_per_minute: 10,
            tokens_per_minute: 1000,
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            files_per_request: 1,
            upload_max_bytes: 1,
            monthly: MonthlyLimits::default(),
        }
    }

    #[test]
    fn models_need_both_the_tier_and_the_catalogue_to_allow_them() {
        let tiers = Tiers::build(TiersFile {
            default_tier: "free".into(),
            tiers: [
                ("free".to_owned(), tier(&["mock-echo"])),
                ("pro".to_owned(), tier(&["*"])),
            ]
            .into_iter()
            .collect(),
        })
        .unwrap();
        let both = vec!["free".to_owned(), "pro".to_owned()];
        assert!(tiers.allows_model("free", "mock-echo", &both));
        assert!(!tiers.allows_model("free", "gpt-4o", &both));
        assert!(tiers.allows_model("pro", "gpt-4o", &both));
        assert!(!tiers.allows_model("pro", "gpt-4o", &["free".to_owned()]));
        // An unknown tier is treated as the default.
        assert_eq!(tiers.get("gone").0, "free");
    }

    #[test]
    fn bad_files_are_errors() {
        let file = TiersFile {
            default_tier: "nope".into(),
            tiers: [("free".to_owned(), tier(&["*"]))].into_iter().collect(),
        };
        assert!(matches!(
            Tiers::build(file),
            Err(TiersError::UnknownDefault(_))
        ));
    }
}
