//! `POST /api/v1/search`: hybrid search over the caller's documents.
//!
//! The query is embedded here, at the edge, so the user's session spends its mailbox time on
//! the index only; the session checks the documents and the tier's RAG limit and searches.

use chorus_actors::session::SearchQuery;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;
use warp::http::StatusCode;
use warp::reply::Response;

use super::context::{Body, Ctx, json_response};
use super::error::ApiError;

/// Longest query (characters) and the most results one search returns.
const QUERY_MAX_CHARS: usize = 2000;
const TOP_K_MAX: usize = 50;
const TOP_K_DEFAULT: usize = 5;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchBody {
    query: String,
    #[serde(default)]
    document_ids: Option<Vec<String>>,
    #[serde(default)]
    top_k: Option<usize>,
}

pub async fn search(ctx: Ctx, body: Body) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let body: SearchBody = ctx.json(body).await?;
    let query = body.query.trim().to_owned();
    if query.is_empty() {
        return Err(ApiError::field("query", "must not be empty"));
    }
    if query.chars().count() > QUERY_MAX_CHARS {
        return Err(ApiError::field(
            "query",
            format!("at most {QUERY_MAX_CHARS} characters"),
        ));
    }
    let top_k = body.top_k.unwrap_or(TOP_K_DEFAULT);
    if !(1..=TOP_K_MAX).contains(&top_k) {
        return Err(ApiError::field(
            "top_k",
            format!("must be within 1..={TOP_K_MAX}"),
        ));
    }
    // An id that is not a document id cannot be one of the user's documents: 404 like any other.
    let document_ids = match body.document_ids {
        None => None,
        Some(ids) => Some(
            ids.iter()
                .map(|id| Uuid::parse_str(id).map_err(|_| ApiError::not_found("document")))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let embedding = match &ctx.state.embedder {
        Some(embedder) => match embedder.embed(std::slice::from_ref(&query)).await {
            Ok(mut vectors) => vectors.pop(),
            Err(e) => {
                // Still answer: lexically, and say so in `mode`.
                tracing::warn!(error = %e, "embedding a search query failed; searching lexically");
                None
            }
        },
        None => None,
    };
    let results = ctx
        .state
        .homes
        .search(
            principal.user_id,
            SearchQuery {
                query,
                embedding,
                document_ids,
                top_k,
            },
        )
        .await
        .map_err(|e| ApiError::from_session(e, "document"))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "mode": results.mode, "results": results.results }),
    ))
}
