//! `/api/v1/admin/*`: operator actions, for callers with the admin role.
//!
//! The access token says who is an admin, so other users are refused without a store call; the
//! store then confirms it, so a demoted admin loses these routes at once rather than when their
//! token expires. Changes to a user go through that user's session, like their own edits.

use chorus_actors::session::TierRoleChange;
use chorus_actors::store::Role;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;
use warp::http::StatusCode;
use warp::reply::Response;

use super::context::{Body, Ctx, Principal, json_response};
use super::error::{ApiError, ErrorCode};
use super::patch::double_option;
use super::views::UserView;
use crate::config::Config;

/// The caller, if they are an admin by token and by the store; 403 otherwise.
async fn require_admin(ctx: &Ctx) -> Result<Principal, ApiError> {
    let principal = ctx.authenticate()?;
    let forbidden = || ApiError::new(ErrorCode::Forbidden, "admin role required");
    if principal.claims.role != Role::Admin {
        return Err(forbidden());
    }
    match ctx.state.store.get_user(principal.user_id).await? {
        Some(user) if user.role == Role::Admin => Ok(principal),
        _ => Err(forbidden()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchUserBody {
    #[serde(default, deserialize_with = "double_option")]
    tier: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    role: Option<Option<Role>>,
}

/// A tier id that exists in the configured tiers, or a 400 naming the valid ones.
pub fn known_tier(config: &Config, field: &str, tier: &str) -> Result<String, ApiError> {
    if config.tiers.contains(tier) {
        return Ok(tier.to_owned());
    }
    let valid: Vec<&str> = config.tiers.ids().collect();
    Err(ApiError::field(
        field,
        format!("unknown tier `{tier}`; valid tiers: {}", valid.join(", ")),
    )
    .with_detail("valid", json!(valid)))
}

/// `PATCH /api/v1/admin/users/{id}` `{tier?, role?}` → `{user}`.
pub async fn patch_user(ctx: Ctx, id: String, body: Body) -> Result<Response, ApiError> {
    let admin = require_admin(&ctx).await?;
    let body: PatchUserBody = ctx.json(body).await?;
    let mut change = TierRoleChange::default();
    match body.tier {
        None => {}
        Some(None) => return Err(ApiError::field("tier", "cannot be null")),
        Some(Some(tier)) => change.tier = Some(known_tier(&ctx.state.config, "tier", &tier)?),
    }
    match body.role {
        None => {}
        Some(None) => return Err(ApiError::field("role", "cannot be null")),
        Some(Some(role)) => change.role = Some(role),
    }
    let user_id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("user"))?;
    if user_id == admin.user_id && change.role == Some(Role::User) {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "an admin cannot remove their own admin role; ask another admin",
        ));
    }
    // Checked here so an unknown id does not start a session.
    if ctx.state.store.get_user(user_id).await?.is_none() {
        return Err(ApiError::not_found("user"));
    }
    let user = ctx
        .state
        .homes
        .set_tier_role(user_id, change)
        .await
        .map_err(|e| ApiError::from_session(e, "user"))?;
    tracing::info!(
        admin = %admin.user_id,
        user_id = %user.id,
        tier = %user.tier,
        role = user.role.as_str(),
        "admin changed a user"
    );
    Ok(json_response(
        StatusCode::OK,
        &json!({ "user": UserView::from(&user) }),
    ))
}

/// `GET /api/v1/admin/providers` → `{providers: [{provider, deployments: [...]}], buckets}`:
/// each deployment's health, breaker, in-flight calls, latency and rate bucket levels.
pub async fn providers(ctx: Ctx) -> Result<Response, ApiError> {
    require_admin(&ctx).await?;
    let pools = ctx.state.catalogue.pools();
    let snapshot = pools.snapshot().await;
    let buckets = pools
        .buckets()
        .map(|b| json!({ "backend": b.backend(), "health": b.health() }));
    Ok(json_response(
        StatusCode::OK,
        &json!({ "providers": snapshot, "buckets": buckets }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterQuery {
    /// Also say where this user is homed.
    #[serde(default)]
    user: Option<String>,
}

/// `GET /api/v1/admin/cluster[?user=ID]` → this node's view of the cluster: members with their
/// state, the ring (members, virtual nodes, digest), the view's version and digest (equal on
/// nodes that agree), relayed streams, and with `user` that user's home.
pub async fn cluster(ctx: Ctx) -> Result<Response, ApiError> {
    require_admin(&ctx).await?;
    let query: ClusterQuery = ctx.query()?;
    let cluster = &ctx.state.cluster;
    let view = cluster.view();
    let members: Vec<_> = view
        .members
        .iter()
        .map(|m| {
            json!({
                "name": m.name,
                "addr": m.addr,
                "state": m.state.as_str(),
                "last_heard_ms": m.last_heard.map(|d| d.as_millis() as u64),
            })
        })
        .collect();
    let relay = cluster.relay_stats();
    let mut body = json!({
        "node": cluster.local_node().as_str(),
        "clustered": cluster.is_clustered(),
        "version": view.version,
        "digest": view.digest(),
        "members": members,
        "ring": {
            "members": view.ring.members().iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            "vnodes": view.ring.vnodes(),
            "digest": view.ring.digest(),
        },
        "relay": {
            "sending": relay.sending,
            "sending_waiting_for_credit": relay.sending_waiting_for_credit,
            "receiving": relay.receiving,
        },
        "sessions_live": ctx.state.sessions.live_count(),
    });
    if let Some(user) = query.user {
        let user = Uuid::parse_str(&user).map_err(|_| ApiError::field("user", "not a user id"))?;
        body["user"] = json!({
            "id": user,
            "home": view.ring.home(user).unwrap_or(cluster.local_node().as_str()),
        });
    }
    Ok(json_response(StatusCode::OK, &body))
}
