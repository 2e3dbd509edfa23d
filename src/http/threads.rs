//! `/api/v1/threads*`: create, list (cursor, `q`, `bookmarked`), get, patch, delete, and list
//! messages. Changes go through the user's session; reads go straight to the store. Ids that
//! are malformed or belong to someone else answer 404 alike, so ids cannot be probed.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chorus_actors::session::{NewThread, ThreadPatch};
use chorus_actors::store::{MessageQuery, Order, ThreadCursor, ThreadQuery};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;
use warp::http::StatusCode;
use warp::reply::Response;

use super::context::{Body, Ctx, json_response, no_content};
use super::error::ApiError;
use super::patch::double_option;
use super::validate;
use super::views::{MessageView, ThreadView};

fn thread_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found("thread"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateThreadBody {
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    system_prompt: Option<String>,
    #[serde(default)]
    model: Option<String>,
}

pub async fn create(ctx: Ctx, body: Body) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let body: CreateThreadBody = ctx.json(body).await?;
    let limits = &ctx.state.config.limits;
    let new = NewThread {
        title: validate::optional_text("title", body.title, limits.title_max_chars)?,
        system_prompt: validate::optional_text(
            "system_prompt",
            body.system_prompt,
            limits.system_prompt_max_chars,
        )?,
        model: validate::model("model", body.model)?,
    };
    let thread = ctx
        .state
        .homes
        .create_thread(principal.user_id, new)
        .await?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({ "thread": ThreadView::new(&thread) }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListThreadsQuery {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    q: Option<String>,
    #[serde(default)]
    bookmarked: Option<bool>,
}

#[derive(serde::Serialize, Deserialize)]
struct ThreadCursorWire {
    /// `updated_at` in unix microseconds.
    u: i64,
    id: Uuid,
}

fn encode_thread_cursor(cursor: &ThreadCursor) -> String {
    let wire = ThreadCursorWire {
        u: cursor.updated_at.timestamp_micros(),
        id: cursor.id,
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&wire).unwrap_or_default())
}

fn decode_thread_cursor(raw: &str) -> Result<ThreadCursor, ApiError> {
    let invalid = || ApiError::field("cursor", "invalid cursor; pass next_cursor unchanged");
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid())?;
    let wire: ThreadCursorWire = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    let updated_at = chrono::DateTime::from_timestamp_micros(wire.u).ok_or_else(invalid)?;
    Ok(ThreadCursor {
        updated_at,
        id: wire.id,
    })
}

pub async fn list(ctx: Ctx) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let query: ListThreadsQuery = ctx.query()?;
    let q = query
        .q
        .map(|q| q.trim().to_owned())
        .filter(|q| !q.is_empty());
    if q.as_ref().is_some_and(|q| q.chars().count() > 200) {
        return Err(ApiError::field("q", "must be at most 200 characters"));
    }
    let store_query = ThreadQuery {
        limit: validate::page_limit(query.limit)?,
        cursor: query
            .cursor
            .as_deref()
            .map(decode_thread_cursor)
            .transpose()?,
        q,
        bookmarked: query.bookmarked,
    };
    let page = ctx
        .state
        .store
        .list_threads(principal.user_id, &store_query)
        .await?;
    let threads: Vec<ThreadView> = page.items.iter().map(ThreadView::new).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "threads": threads,
            "next_cursor": page.next.as_ref().map(encode_thread_cursor),
        }),
    ))
}

pub async fn get(ctx: Ctx, id: String) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let id = thread_id(&id)?;
    let store = &ctx.state.store;
    let thread = store
        .get_thread(principal.user_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("thread"))?;
    let stats = store.thread_model_stats(principal.user_id, id).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "thread": ThreadView::new(&thread).with_models(&stats) }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchThreadBody {
    #[serde(default, deserialize_with = "double_option")]
    title: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    system_prompt: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    model: Option<Option<String>>,
    #[serde(default)]
    bookmarked: Option<bool>,
}

pub async fn patch(ctx: Ctx, id: String, body: Body) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let id = thread_id(&id)?;
    let body: PatchThreadBody = ctx.json(body).await?;
    let limits = &ctx.state.config.limits;
    let patch = ThreadPatch {
        title: body
            .title
            .map(|t| validate::optional_text("title", t, limits.title_max_chars))
            .transpose()?,
        system_prompt: body
            .system_prompt
            .map(|p| validate::optional_text("system_prompt", p, limits.system_prompt_max_chars))
            .transpose()?,
        model: body
            .model
            .map(|m| validate::model("model", m))
            .transpose()?,
        bookmarked: body.bookmarked,
    };
    let thread = ctx
        .state
        .homes
        .update_thread(principal.user_id, id, patch)
        .await
        .map_err(|e| ApiError::from_session(e, "thread"))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "thread": ThreadView::new(&thread) }),
    ))
}

pub async fn delete(ctx: Ctx, id: String) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let id = thread_id(&id)?;
    ctx.state
        .homes
        .delete_thread(principal.user_id, id)
        .await
        .map_err(|e| ApiError::from_session(e, "thread"))?;
    Ok(no_content())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListMessagesQuery {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    order: Option<OrderParam>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum OrderParam {
    Asc,
    Desc,
}

pub async fn list_messages(ctx: Ctx, id: String) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let id = thread_id(&id)?;
    let query: ListMessagesQuery = ctx.query()?;
    let cursor = query
        .cursor
        .as_deref()
        .map(|c| {
            Uuid::parse_str(c).map_err(|_| {
                ApiError::field("cursor", "invalid cursor; pass next_cursor unchanged")
            })
        })
        .transpose()?;
    let store_query = MessageQuery {
        limit: validate::page_limit(query.limit)?,
        cursor,
        order: match query.order {
            Some(OrderParam::Desc) => Order::Desc,
            Some(OrderParam::Asc) | None => Order::Asc,
        },
        model: validate::model("model", query.model)?,
    };
    let store = &ctx.state.store;
    if store.get_thread(principal.user_id, id).await?.is_none() {
        return Err(ApiError::not_found("thread"));
    }
    let page = store
        .list_messages(principal.user_id, id, &store_query)
        .await?;
    let messages: Vec<MessageView> = page.items.iter().map(MessageView::from).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "messages": messages,
            "next_cursor": page.next.map(|id| id.to_string()),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cursor_round_trips_and_rejects_garbage() {
        let cursor = ThreadCursor {
            updated_at: chrono::DateTime::from_timestamp_micros(1_763_700_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        let encoded = encode_thread_cursor(&cursor);
        assert_eq!(decode_thread_cursor(&encoded).unwrap(), cursor);
        assert!(decode_thread_cursor("not-a-cursor").is_err());
        assert!(decode_thread_cursor(&URL_SAFE_NO_PAD.encode(b"{}")).is_err());
    }
}
