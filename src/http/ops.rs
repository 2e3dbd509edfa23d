//! `/healthz` (the process is alive) and `/readyz` (it can serve: store reachable, not draining).

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
    let ready = !draining && store == "ok";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(json_response(
        status,
        &json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": {
                "store": store,
                "shutdown": if draining { "draining" } else { "running" },
            },
            "node": ctx.state.placement.local_node().as_str(),
            "sessions": ctx.state.sessions.live_count(),
        }),
    ))
}
