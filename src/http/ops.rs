//! `/healthz` (the process is alive) and `/readyz` (it can serve: store reachable, not draining).

use chorus_actors::quota::BackendHealth;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;

use super::context::{Ctx, json_response};
use super::error::ApiError;

pub async fn healthz(_ctx: Ctx) -> Result<Response, ApiError> {
    Ok(json_response(StatusCode::OK, &json!({ "status": "ok" })))
}

pub async fn readyz(ctx: Ctx) -> Result<Response, ApiError> {
    let draining = ctx.state.shutting_down.load(Ordering::Relaxed);
    let store = match tokio::time::timeout(Duration::from_secs(2), ctx.state.store.ping()).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "error: timed out after 2s".to_owned(),
    };
    // Redis down is "degraded", not "not ready": every node would leave the load balancer at
    // once and block all traffic, while each can go on with its local share of the limits.
    let buckets = &ctx.state.shared_buckets;
    let redis = match (buckets.backend(), buckets.health()) {
        ("redis", BackendHealth::Healthy) => Some("ok".to_owned()),
        ("redis", BackendHealth::Degraded { reason }) => Some(format!(
            "degraded: {reason}; limits answered with this node's local share"
        )),
        _ => None,
    };
    // Clustered: the members this node counts. A node alone is still ready once it has joined
    // (it may be the first of a new cluster, or the last of an old one); while joining it is no
    // one's home yet, so not ready.
    let joining = ctx.state.cluster.is_joining();
    let cluster = ctx.state.cluster.is_clustered().then(|| {
        let view = ctx.state.cluster.view();
        format!(
            "{}{} members, ring version {}",
            if joining { "joining: " } else { "" },
            view.members.len(),
            view.version
        )
    });
    let ready = !draining && !joining && store == "ok";
    let degraded = redis.as_deref().is_some_and(|r| r != "ok");
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(json_response(
        status,
        &json!({
            "status": match (ready, degraded) {
                (false, _) => "not_ready",
                (true, true) => "degraded",
                (true, false) => "ready",
            },
            "checks": {
                "store": store,
                "redis": redis.as_deref().unwrap_or("not configured (limits in-process)"),
                "shutdown": if draining { "draining" } else { "running" },
                "cluster": cluster.as_deref().unwrap_or("single node"),
            },
            "node": ctx.state.cluster.local_node().as_str(),
            "sessions": ctx.state.sessions.live_count(),
        }),
    ))
}
