//! `/api/v1/me*`: the caller's profile, usage and API keys.

use chorus_actors::session::ProfilePatch;
use chorus_actors::store::ApiKey;
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;
use warp::http::StatusCode;
use warp::reply::Response;

use super::context::{Body, Ctx, json_response, no_content};
use super::error::ApiError;
use super::patch::double_option;
use super::validate;
use super::views::{ApiKeyView, UserView};
use crate::auth::tokens;

pub async fn get_me(ctx: Ctx) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let user = ctx
        .state
        .store
        .get_user(principal.user_id)
        .await?
        .ok_or_else(|| ApiError::unauthenticated("account no longer exists"))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "user": UserView::from(&user) }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchMeBody {
    #[serde(default, deserialize_with = "double_option")]
    display_name: Option<Option<String>>,
    #[serde(default)]
    settings: Option<SettingsPatchBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsPatchBody {
    #[serde(default, deserialize_with = "double_option")]
    default_model: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    temperature: Option<Option<f64>>,
    #[serde(default, deserialize_with = "double_option")]
    system_prompt: Option<Option<String>>,
}

pub async fn patch_me(ctx: Ctx, body: Body) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let body: PatchMeBody = ctx.json(body).await?;
    let limits = &ctx.state.config.limits;
    let mut patch = ProfilePatch::default();
    if let Some(name) = body.display_name {
        patch.display_name = Some(validate::optional_text(
            "display_name",
            name,
            limits.name_max_chars,
        )?);
    }
    if let Some(settings) = body.settings {
        if let Some(model) = settings.default_model {
            patch.default_model = Some(validate::model("settings.default_model", model)?);
        }
        if let Some(temperature) = settings.temperature {
            if let Some(t) = temperature
                && !(0.0..=2.0).contains(&t)
            {
                return Err(ApiError::field(
                    "settings.temperature",
                    "must be between 0 and 2",
                ));
            }
            patch.temperature = Some(temperature);
        }
        if let Some(prompt) = settings.system_prompt {
            patch.system_prompt = Some(validate::optional_text(
                "settings.system_prompt",
                prompt,
                limits.system_prompt_max_chars,
            )?);
        }
    }
    let user = ctx
        .state
        .homes
        .update_profile(principal.user_id, patch)
        .await
        .map_err(|e| match e {
            chorus_actors::session::SessionError::NotFound => {
                ApiError::unauthenticated("account no longer exists")
            }
            other => other.into(),
        })?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "user": UserView::from(&user) }),
    ))
}

/// `GET /api/v1/me/usage`: the tier's limits (`null` = unlimited) and this month's counters.
pub async fn get_usage(ctx: Ctx) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let now = Utc::now();
    let period = chorus_actors::quota::period_of(now);
    // The stored tier, not the token's: an upgrade shows at once.
    let user = ctx
        .state
        .store
        .get_user(principal.user_id)
        .await?
        .ok_or_else(|| ApiError::unauthenticated("account no longer exists"))?;
    let (tier_id, tier) = ctx.state.config.tiers.get(&user.tier);
    // `/v1` usage is written by the user's session in batches: have it write what it holds.
    ctx.state.homes.flush_usage(principal.user_id).await?;
    let used = ctx
        .state
        .store
        .get_usage(principal.user_id, &period)
        .await?;
    // Cost is counted in micro-dollars so the counter stays an exact integer.
    let cost_usd = used.get("cost_micro_usd").copied().unwrap_or(0) as f64 / 1_000_000.0;
    let mut limits = serde_json::Map::new();
    let mut counters = serde_json::Map::new();
    for (kind, limit) in tier.monthly.entries() {
        limits.insert(kind.to_owned(), json!(limit));
        counters.insert(kind.to_owned(), json!(used.get(kind).copied().unwrap_or(0)));
    }
    limits.insert(
        "requests_per_minute".into(),
        json!(tier.requests_per_minute),
    );
    limits.insert("tokens_per_minute".into(), json!(tier.tokens_per_minute));
    limits.insert("files_per_request".into(), json!(tier.files_per_request));
    limits.insert("upload_max_bytes".into(), json!(tier.upload_max_bytes));
    // Any other counter the store keeps is reported too.
    for (kind, value) in used {
        if kind != "cost_micro_usd" && !counters.contains_key(&kind) {
            counters.insert(kind, json!(value));
        }
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "period": period,
            "tier": tier_id,
            "tier_name": tier.name,
            "limits": limits,
            "used": counters,
            "cost_usd": cost_usd,
            "resets_at": chorus_actors::quota::next_period_start(now)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateApiKeyBody {
    name: String,
}

pub async fn create_api_key(ctx: Ctx, body: Body) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let body: CreateApiKeyBody = ctx.json(body).await?;
    let limits = &ctx.state.config.limits;
    let name = validate::optional_text("name", Some(body.name), limits.name_max_chars)?
        .ok_or_else(|| ApiError::field("name", "must not be empty"))?;
    let key = tokens::new_api_key();
    let row = ApiKey {
        id: Uuid::now_v7(),
        key_hash: tokens::hash_secret(&key),
        user_id: principal.user_id,
        name,
        scopes: vec!["chat".into()],
        created_at: Utc::now(),
        last_used_at: None,
    };
    let row = ctx
        .state
        .homes
        .create_api_key(principal.user_id, row, limits.api_keys_per_user)
        .await?;
    let mut view = serde_json::to_value(ApiKeyView::from(&row))
        .map_err(|e| ApiError::internal("serializing api key", &e))?;
    view["key"] = json!(key);
    Ok(json_response(StatusCode::CREATED, &view))
}

pub async fn list_api_keys(ctx: Ctx) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let keys = ctx.state.store.list_api_keys(principal.user_id).await?;
    let views: Vec<ApiKeyView> = keys.iter().map(ApiKeyView::from).collect();
    Ok(json_response(StatusCode::OK, &json!({ "api_keys": views })))
}

pub async fn delete_api_key(ctx: Ctx, key_id: String) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let key_id = Uuid::parse_str(&key_id).map_err(|_| ApiError::not_found("api key"))?;
    ctx.state
        .homes
        .delete_api_key(principal.user_id, key_id)
        .await
        .map_err(|e| ApiError::from_session(e, "api key"))?;
    ctx.state.api_keys.evict(key_id);
    Ok(no_content())
}

/// Providers a user may bring their own key for (Ollama runs keyless).
pub const BYOK_PROVIDERS: &[&str] = &["openai", "anthropic", "gemini", "groq", "openrouter", "xai"];

fn byok_provider(raw: &str) -> Result<&'static str, ApiError> {
    BYOK_PROVIDERS
        .iter()
        .find(|p| **p == raw)
        .copied()
        .ok_or_else(|| {
            ApiError::field(
                "provider",
                format!(
                    "unknown provider `{raw}`; one of: {}",
                    BYOK_PROVIDERS.join(", ")
                ),
            )
        })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutProviderKeyBody {
    api_key: String,
}

pub async fn put_provider_key(
    ctx: Ctx,
    provider: String,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let provider = byok_provider(&provider)?;
    let body: PutProviderKeyBody = ctx.json(body).await?;
    let api_key = body.api_key.trim();
    if api_key.is_empty() || api_key.len() > 1000 || api_key.chars().any(char::is_control) {
        return Err(ApiError::field(
            "api_key",
            "must be 1-1000 characters without control characters",
        ));
    }
    let sealed = ctx
        .state
        .provider_keys
        .seal(principal.user_id, provider, api_key)?;
    ctx.state
        .homes
        .put_provider_key(chorus_actors::store::ProviderKey {
            user_id: principal.user_id,
            provider: provider.to_owned(),
            sealed,
            updated_at: Utc::now(),
        })
        .await?;
    tracing::info!(provider, "provider key stored");
    Ok(no_content())
}

pub async fn list_provider_keys(ctx: Ctx) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let stored = ctx
        .state
        .store
        .list_provider_keys(principal.user_id)
        .await?;
    let providers: serde_json::Map<String, serde_json::Value> = BYOK_PROVIDERS
        .iter()
        .map(|provider| {
            let entry = match stored.iter().find(|k| k.provider == *provider) {
                Some(key) => json!({
                    "configured": true,
                    "updated_at": key.updated_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                }),
                None => json!({ "configured": false }),
            };
            ((*provider).to_owned(), entry)
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "providers": providers }),
    ))
}

pub async fn delete_provider_key(ctx: Ctx, provider: String) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let provider = byok_provider(&provider)?;
    ctx.state
        .homes
        .delete_provider_key(principal.user_id, provider)
        .await
        .map_err(|e| ApiError::from_session(e, "provider key"))?;
    Ok(no_content())
}
