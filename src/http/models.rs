//! `GET /api/v1/models`: the models this server can use now (providers with keys, plus mock).

use serde_json::{Value, json};
use warp::http::StatusCode;
use warp::reply::Response;

use super::context::{Ctx, json_response};
use super::error::ApiError;

pub async fn list(ctx: Ctx) -> Result<Response, ApiError> {
    ctx.authenticate()?;
    let models: Vec<Value> = ctx
        .state
        .catalogue
        .models()
        .iter()
        .map(|m| {
            json!({
                "id": m.spec.id,
                "name": m.spec.name,
                "provider": &*m.provider_id,
                "mock": m.is_mock(),
                "capabilities": m.spec.capabilities,
                "context_length": m.spec.context_length,
                "pricing": {
                    "input_per_mtok": m.spec.input_per_mtok,
                    "output_per_mtok": m.spec.output_per_mtok,
                },
                "tiers": m.spec.tiers,
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, &json!({ "models": models })))
}
