//! JSON shapes of the contract (API.md). Rows from the store never go out directly, so a new
//! column never leaks (password hashes, token hashes) by accident.

use std::collections::BTreeMap;

use chorus_actors::store::{
    ApiKey, Message, MessageRole, MessageStatus, ModelStats, Role, Thread, Usage, User,
    UserSettings,
};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde::Serializer;
use uuid::Uuid;

/// RFC 3339 UTC with millisecond precision and a `Z`, as API.md asks.
pub fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn rfc3339_opt<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

#[derive(Serialize)]
pub struct UserView<'a> {
    pub id: Uuid,
    pub email: &'a str,
    pub display_name: Option<&'a str>,
    pub tier: &'a str,
    pub role: Role,
    pub settings: SettingsView<'a>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
}

/// The settings a user has set (unset ones are left out: `{}` for a new account).
#[derive(Serialize)]
pub struct SettingsView<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_prompt: Option<&'a str>,
}

impl<'a> From<&'a UserSettings> for SettingsView<'a> {
    fn from(s: &'a UserSettings) -> Self {
        SettingsView {
            default_model: s.default_model.as_deref(),
            temperature: s.temperature,
            system_prompt: s.system_prompt.as_deref(),
        }
    }
}

impl<'a> From<&'a User> for UserView<'a> {
    fn from(u: &'a User) -> Self {
        UserView {
            id: u.id,
            email: &u.email,
            display_name: u.display_name.as_deref(),
            tier: &u.tier,
            role: u.role,
            settings: SettingsView::from(&u.settings),
            created_at: u.created_at,
        }
    }
}

#[derive(Serialize)]
pub struct ApiKeyView<'a> {
    pub id: Uuid,
    pub name: &'a str,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_opt")]
    pub last_used_at: Option<DateTime<Utc>>,
}

impl<'a> From<&'a ApiKey> for ApiKeyView<'a> {
    fn from(k: &'a ApiKey) -> Self {
        ApiKeyView {
            id: k.id,
            name: &k.name,
            created_at: k.created_at,
            last_used_at: k.last_used_at,
        }
    }
}

#[derive(Serialize)]
pub struct ModelStatsView<'a> {
    pub message_count: i64,
    pub summary: Option<&'a str>,
}

#[derive(Serialize)]
pub struct ThreadView<'a> {
    pub id: Uuid,
    pub title: Option<&'a str>,
    pub system_prompt: Option<&'a str>,
    pub model: Option<&'a str>,
    pub bookmarked: bool,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: DateTime<Utc>,
    pub message_count: i64,
    /// Only on `GET /threads/{id}`: per-model counts and summaries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<BTreeMap<&'a str, ModelStatsView<'a>>>,
}

impl<'a> ThreadView<'a> {
    pub fn new(t: &'a Thread) -> Self {
        ThreadView {
            id: t.id,
            title: t.title.as_deref(),
            system_prompt: t.system_prompt.as_deref(),
            model: t.model.as_deref(),
            bookmarked: t.bookmarked,
            created_at: t.created_at,
            updated_at: t.updated_at,
            message_count: t.message_count,
            models: None,
        }
    }

    pub fn with_models(mut self, stats: &'a [ModelStats]) -> Self {
        self.models = Some(
            stats
                .iter()
                .map(|s| {
                    (
                        s.model.as_str(),
                        ModelStatsView {
                            message_count: s.message_count,
                            summary: s.summary.as_ref().map(|sum| sum.text.as_str()),
                        },
                    )
                })
                .collect(),
        );
        self
    }
}

#[derive(Serialize)]
pub struct MessageView<'a> {
    pub id: Uuid,
    pub thread_id: Uuid,
    pub role: MessageRole,
    pub model: Option<&'a str>,
    pub content: &'a str,
    pub status: MessageStatus,
    pub usage: Usage,
    pub cost_usd: f64,
    pub latency_ms: Option<i64>,
    pub ttft_ms: Option<i64>,
    pub provider: Option<&'a str>,
    /// The deployment (models.toml) that served an assistant message.
    pub deployment: Option<&'a str>,
    /// Document passages the answer was given (document, position, text).
    pub citations: &'a [chorus_actors::store::Citation],
    pub parent_id: Option<Uuid>,
    pub turn_id: Option<Uuid>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
}

impl<'a> From<&'a Message> for MessageView<'a> {
    fn from(m: &'a Message) -> Self {
        MessageView {
            id: m.id,
            thread_id: m.thread_id,
            role: m.role,
            model: m.model.as_deref(),
            content: &m.content,
            status: m.status,
            usage: m.usage,
            cost_usd: m.cost_usd,
            latency_ms: m.latency_ms,
            ttft_ms: m.ttft_ms,
            provider: m.provider.as_deref(),
            deployment: m.deployment.as_deref(),
            citations: &m.citations,
            parent_id: m.parent_id,
            turn_id: m.turn_id,
            created_at: m.created_at,
        }
    }
}
