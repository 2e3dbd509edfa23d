//! `/api/v1/auth/*`: register, login, refresh (rotation with reuse detection), logout.
//!
//! Refresh tokens form families: each login starts one, each refresh spends the presented token
//! and issues the next of the same family. Presenting a spent token means it was copied, so the
//! whole family is revoked and both holders must log in again (OAuth 2.0 Security BCP, §4.14).

use chorus_actors::quota::Admission;
use chorus_actors::store::{RefreshToken, Role, SpendOutcome, User, UserSettings};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;
use warp::http::StatusCode;
use warp::reply::Response;

use super::context::{Body, Ctx, json_response, no_content};
use super::error::ApiError;
use super::validate;
use super::views::UserView;
use crate::auth::{password, tokens};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    email: String,
    password: String,
    #[serde(default)]
    display_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    email: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    refresh_token: String,
}

pub async fn register(ctx: Ctx, body: Body) -> Result<Response, ApiError> {
    let ip_decision = limit_by_ip(&ctx).await?;
    let body: RegisterBody = ctx.json(body).await?;
    let limits = &ctx.state.config;
    let email = validate::email(&body.email)?;
    validate::password(
        &body.password,
        limits.auth.password_min_chars,
        limits.auth.password_max_chars,
    )?;
    let display_name = validate::optional_text(
        "display_name",
        body.display_name,
        limits.limits.name_max_chars,
    )?;

    let password_hash = password::hash_password(body.password).await?;
    let now = Utc::now();
    let user = User {
        id: Uuid::now_v7(),
        email,
        display_name,
        password_hash,
        tier: ctx.state.config.tiers.default_tier().to_owned(),
        role: Role::User,
        settings: UserSettings::default(),
        created_at: now,
        updated_at: now,
    };
    ctx.state
        .store
        .create_user(&user)
        .await
        .map_err(|e| match e {
            chorus_actors::store::StoreError::Conflict(_) => ApiError::new(
                super::error::ErrorCode::Conflict,
                "an account with this email already exists",
            ),
            other => other.into(),
        })?;
    tracing::info!(user_id = %user.id, "account registered");
    let mut response = token_response(&ctx, &user, Uuid::now_v7(), StatusCode::CREATED).await?;
    super::error::set_rate_limit_headers(&mut response, &ip_decision);
    Ok(response)
}

pub async fn login(ctx: Ctx, body: Body) -> Result<Response, ApiError> {
    let ip_decision = limit_by_ip(&ctx).await?;
    let body: LoginBody = ctx.json(body).await?;
    let email = body.email.trim().to_lowercase();
    if email.is_empty() || body.password.is_empty() {
        return Err(ApiError::validation("email and password are required"));
    }
    // Per-account throttling counts failures only, so a stranger cannot lock a user out by
    // merely trying; it stops guessing once failures pile up. The token is taken before the
    // (slow) password check and given back on success, so parallel guesses cannot all slip
    // through one remaining token.
    let account_key = format!("login:{email}");
    let account = ctx
        .state
        .limiters
        .login_failures
        .acquire(&account_key)
        .await;
    if !account.allowed {
        return Err(ApiError::rate_limited(
            account,
            "too many failed logins for this account; retry later",
        ));
    }
    let user = match ctx.state.store.get_user_by_email(&email).await {
        Ok(user) => user,
        Err(e) => {
            ctx.state.limiters.login_failures.refund(&account_key).await;
            return Err(e.into());
        }
    };
    let stored_hash = user.as_ref().map(|u| u.password_hash.clone());
    let verified = password::verify_password(body.password, stored_hash).await;
    let Some(user) = user.filter(|_| verified) else {
        return Err(ApiError::unauthenticated("invalid email or password"));
    };
    ctx.state.limiters.login_failures.refund(&account_key).await;
    tracing::info!(user_id = %user.id, "login");
    let mut response = token_response(&ctx, &user, Uuid::now_v7(), StatusCode::OK).await?;
    super::error::set_rate_limit_headers(&mut response, &ip_decision);
    Ok(response)
}

pub async fn refresh(ctx: Ctx, body: Body) -> Result<Response, ApiError> {
    limit_by_ip(&ctx).await?;
    let body: RefreshBody = ctx.json(body).await?;
    let hash = tokens::hash_secret(&body.refresh_token);
    let now = Utc::now();
    let store = &ctx.state.store;
    let spent = match store.spend_refresh_token(&hash, now).await? {
        SpendOutcome::Spent(token) => token,
        SpendOutcome::NotFound => return Err(ApiError::unauthenticated("invalid refresh token")),
        SpendOutcome::AlreadyUsed(token) => {
            if token.spent_at.is_some() {
                let revoked = store
                    .revoke_refresh_family(token.user_id, token.family_id, now)
                    .await?;
                tracing::warn!(
                    user_id = %token.user_id,
                    family_id = %token.family_id,
                    revoked,
                    "refresh token reuse detected; family revoked"
                );
                return Err(ApiError::unauthenticated(
                    "refresh token was already used; this login was revoked, sign in again",
                ));
            }
            return Err(ApiError::unauthenticated("refresh token revoked"));
        }
    };
    if spent.expires_at <= now {
        return Err(ApiError::unauthenticated("refresh token expired"));
    }
    let user = store
        .get_user(spent.user_id)
        .await?
        .ok_or_else(|| ApiError::unauthenticated("account no longer exists"))?;
    let response = token_response(&ctx, &user, spent.family_id, StatusCode::OK).await?;
    // A concurrent reuse of the same token (or a logout) may have revoked the family between our
    // spend and the insert of the new token, missing it. Every revocation marks the spent parent,
    // so checking it after the insert closes the window: either the revoker saw our new token, or
    // we see its mark and revoke again.
    let parent_revoked = store
        .get_refresh_token(&hash)
        .await?
        .is_none_or(|parent| parent.revoked_at.is_some());
    if parent_revoked {
        store
            .revoke_refresh_family(spent.user_id, spent.family_id, Utc::now())
            .await?;
        return Err(ApiError::unauthenticated(
            "this login was revoked while refreshing; sign in again",
        ));
    }
    Ok(response)
}

pub async fn logout(ctx: Ctx, body: Body) -> Result<Response, ApiError> {
    let body: RefreshBody = ctx.json(body).await?;
    let hash = tokens::hash_secret(&body.refresh_token);
    let store = &ctx.state.store;
    // Logging out ends the whole login (every token of the family). Unknown tokens answer 204 as
    // well: logout is idempotent and must not reveal which tokens exist.
    if let Some(token) = store.get_refresh_token(&hash).await? {
        store
            .revoke_refresh_family(token.user_id, token.family_id, Utc::now())
            .await?;
    }
    Ok(no_content())
}

/// One token of the client IP's auth limit (shared by every node when Redis is configured).
async fn limit_by_ip(ctx: &Ctx) -> Result<Admission, ApiError> {
    let key = ctx
        .client_ip()
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "unknown".into());
    let decision = ctx.state.limiters.auth_per_ip.acquire(&key).await;
    if decision.allowed {
        Ok(decision)
    } else {
        Err(ApiError::rate_limited(
            decision,
            "too many authentication requests from this address; retry later",
        ))
    }
}

/// Stores a new refresh token of `family_id` and answers `{user, access_token, refresh_token,
/// expires_in, token_type}`.
async fn token_response(
    ctx: &Ctx,
    user: &User,
    family_id: Uuid,
    status: StatusCode,
) -> Result<Response, ApiError> {
    let now = Utc::now();
    let access_token = ctx.state.jwt.issue_access(user, now.timestamp())?;
    let refresh_token = tokens::new_refresh_token();
    let refresh_ttl = chrono::Duration::from_std(ctx.state.config.auth.refresh_ttl)
        .unwrap_or(chrono::Duration::days(30));
    ctx.state
        .store
        .insert_refresh_token(&RefreshToken {
            token_hash: tokens::hash_secret(&refresh_token),
            user_id: user.id,
            family_id,
            created_at: now,
            expires_at: now + refresh_ttl,
            spent_at: None,
            revoked_at: None,
        })
        .await?;
    Ok(json_response(
        status,
        &json!({
            "user": UserView::from(user),
            "access_token": access_token,
            "refresh_token": refresh_token,
            "token_type": "Bearer",
            "expires_in": ctx.state.jwt.access_ttl().as_secs(),
        }),
    ))
}
