//! `/api/v1/documents*`: upload (multipart, streamed), list, get, delete.
//!
//! An upload is streamed straight into the blob store — never buffered whole — while its size is
//! checked against the user's tier (`upload_max_bytes`, asked of the user's session first; 413
//! beyond it) and its type is sniffed from the bytes and the file name (415 for what cannot be
//! read). Only once the blob is complete and typed does the session store the `pending` row and
//! queue the ingestion; then the answer is 202. Any failure on the way aborts the upload and
//! leaves nothing behind. This route reads its body itself, so `server.body_limit_bytes` (the
//! limit of JSON bodies) does not apply to it; the tier's limit does.
//!
//! Reads go straight to the store; deletes go through the user's session, which also stops a
//! running ingestion and removes the blob. Another user's document is 404, like a missing one.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chorus_actors::blob::{BlobWriter, document_key};
use chorus_actors::indexer::detect::{DocumentKind, Sniffer};
use chorus_actors::store::{Document, DocumentStatus};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;
use warp::http::StatusCode;
use warp::reply::Response;

use super::context::{Body, Ctx, json_response, no_content};
use super::error::{ApiError, ErrorCode};
use super::validate;
use super::views::rfc3339;

/// Room for the multipart framing around the file (boundaries, part headers).
const MULTIPART_OVERHEAD: u64 = 64 * 1024;
/// Longest accepted file name (characters).
const NAME_MAX_CHARS: usize = 255;
/// Longest wait for the next piece of an upload's body.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Serialize)]
pub struct DocumentView<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub mime: &'a str,
    pub size: i64,
    pub status: DocumentStatus,
    pub progress: f64,
    pub chunks: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: DateTime<Utc>,
}

impl<'a> From<&'a Document> for DocumentView<'a> {
    fn from(d: &'a Document) -> Self {
        DocumentView {
            id: d.id,
            name: &d.name,
            mime: &d.mime,
            size: d.size,
            status: d.status,
            progress: d.progress,
            chunks: d.chunk_count,
            error: d.error.as_deref(),
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

fn document_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found("document"))
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        ErrorCode::PayloadTooLarge,
        format!("the file exceeds your plan's upload limit of {limit} bytes"),
    )
    .with_details(json!({ "limit_bytes": limit }))
}

/// `POST /api/v1/documents`, multipart with one `file` field.
pub async fn upload(ctx: Ctx, body: Body) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let user_id = principal.user_id;
    let content_type = ctx
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "send the document as multipart/form-data with a `file` field",
        )
    })?;
    let limit = ctx.state.homes.upload_limit(user_id).await?;
    let declared = ctx
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit.saturating_add(MULTIPART_OVERHEAD)) {
        return Err(too_large(limit));
    }
    let constraints = multer::Constraints::new().size_limit(
        multer::SizeLimit::new().whole_stream(limit.saturating_add(MULTIPART_OVERHEAD)),
    );
    let mut multipart =
        multer::Multipart::with_constraints(body.into_stream(), boundary, constraints);

    let mut stored: Option<(Uuid, String, DocumentKind, u64)> = None;
    loop {
        let field = match next_field(&mut multipart, limit).await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                discard(&ctx, user_id, stored.as_ref().map(|s| s.0)).await;
                return Err(e);
            }
        };
        let name = field.name().unwrap_or("").to_owned();
        if name != "file" || stored.is_some() {
            discard(&ctx, user_id, stored.as_ref().map(|s| s.0)).await;
            return Err(if name == "file" {
                ApiError::field("file", "send one file per request")
            } else {
                ApiError::validation(format!(
                    "unexpected multipart field `{name}`; send only the `file` field"
                ))
            });
        }
        let file_name = file_name(field.file_name())?;
        stored = Some(store_file(&ctx, user_id, field, file_name, limit).await?);
    }
    let Some((id, name, kind, size)) = stored else {
        return Err(ApiError::field(
            "file",
            "missing; send the document as the `file` field",
        ));
    };
    let now = Utc::now();
    let document = Document {
        user_id,
        id,
        name,
        mime: kind.mime().to_owned(),
        size: i64::try_from(size).unwrap_or(i64::MAX),
        status: DocumentStatus::Pending,
        progress: 0.0,
        chunk_count: 0,
        error: None,
        blob_key: document_key(user_id, id),
        created_at: now,
        updated_at: now,
    };
    let document = match ctx.state.homes.create_document(document).await {
        Ok(document) => document,
        Err(e) => {
            discard(&ctx, user_id, Some(id)).await;
            return Err(e.into());
        }
    };
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({ "document": DocumentView::from(&document) }),
    ))
}

/// The next multipart field, with framing errors in the envelope.
async fn next_field<'r>(
    multipart: &mut multer::Multipart<'r>,
    limit: u64,
) -> Result<Option<multer::Field<'r>>, ApiError> {
    match tokio::time::timeout(READ_TIMEOUT, multipart.next_field()).await {
        Err(_) => Err(ApiError::validation("the upload stalled; send it again")),
        Ok(Ok(field)) => Ok(field),
        Ok(Err(e)) => Err(multipart_error(e, limit)),
    }
}

fn multipart_error(error: multer::Error, limit: u64) -> ApiError {
    match error {
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            too_large(limit)
        }
        other => ApiError::validation(format!("malformed multipart body: {other}")),
    }
}

/// The file name as given, without any directory part; required.
fn file_name(raw: Option<&str>) -> Result<String, ApiError> {
    let raw = raw.unwrap_or("");
    let base = raw.rsplit(['/', '\\']).next().unwrap_or("").trim();
    if base.is_empty() {
        return Err(ApiError::field(
            "file",
            "needs a file name (Content-Disposition filename)",
        ));
    }
    if base.chars().any(char::is_control) {
        return Err(ApiError::field(
            "file",
            "the file name must not contain control characters",
        ));
    }
    if base.chars().count() > NAME_MAX_CHARS {
        return Err(ApiError::field(
            "file",
            format!("the file name must be at most {NAME_MAX_CHARS} characters"),
        ));
    }
    Ok(base.to_owned())
}

/// Streams one file into the blob store; the blob exists only if this returns `Ok`.
async fn store_file(
    ctx: &Ctx,
    user_id: Uuid,
    mut field: multer::Field<'_>,
    name: String,
    limit: u64,
) -> Result<(Uuid, String, DocumentKind, u64), ApiError> {
    let id = Uuid::now_v7();
    let key = document_key(user_id, id);
    let blobs = &ctx.state.documents.blobs;
    let mut writer = blobs
        .writer(&key)
        .await
        .map_err(|e| ApiError::internal("starting a blob upload", &e))?;
    let mut sniffer = Sniffer::new();
    let streamed = stream_into(&mut field, &mut writer, &mut sniffer, limit).await;
    if let Err(e) = streamed {
        writer.abort().await;
        return Err(e);
    }
    if sniffer.total() == 0 {
        writer.abort().await;
        return Err(ApiError::field("file", "the file is empty"));
    }
    let kind = match sniffer.finish(&name) {
        Ok(kind) => kind,
        Err(unsupported) => {
            writer.abort().await;
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                unsupported.to_string(),
            ));
        }
    };
    let size = writer
        .finish()
        .await
        .map_err(|e| ApiError::internal("finishing a blob upload", &e))?;
    Ok((id, name, kind, size))
}

async fn stream_into(
    field: &mut multer::Field<'_>,
    writer: &mut BlobWriter,
    sniffer: &mut Sniffer,
    limit: u64,
) -> Result<(), ApiError> {
    loop {
        let chunk = match tokio::time::timeout(READ_TIMEOUT, field.chunk()).await {
            Err(_) => return Err(ApiError::validation("the upload stalled; send it again")),
            Ok(Err(e)) => return Err(multipart_error(e, limit)),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(chunk))) => chunk,
        };
        if writer.written() + chunk.len() as u64 > limit {
            return Err(too_large(limit));
        }
        sniffer.feed(&chunk);
        writer
            .write(&chunk)
            .await
            .map_err(|e| ApiError::internal("writing a blob", &e))?;
    }
}

/// Removes a blob already stored for a request that then failed.
async fn discard(ctx: &Ctx, user_id: Uuid, id: Option<Uuid>) {
    let Some(id) = id else {
        return;
    };
    let key = document_key(user_id, id);
    if let Err(e) = ctx.state.documents.blobs.delete(&key).await {
        tracing::error!(%key, error = %e, "removing the blob of a refused upload failed");
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
}

fn encode_cursor(id: Uuid) -> String {
    URL_SAFE_NO_PAD.encode(id.as_bytes())
}

fn decode_cursor(raw: &str) -> Result<Uuid, ApiError> {
    let invalid = || ApiError::field("cursor", "invalid cursor; pass next_cursor unchanged");
    let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| invalid())?;
    Uuid::from_slice(&bytes).map_err(|_| invalid())
}

/// `GET /api/v1/documents`: newest first.
pub async fn list(ctx: Ctx) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let query: ListQuery = ctx.query()?;
    let limit = validate::page_limit(query.limit)?;
    let cursor = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let page = ctx
        .state
        .store
        .list_documents(principal.user_id, limit, cursor)
        .await?;
    let documents: Vec<DocumentView> = page.items.iter().map(DocumentView::from).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "documents": documents,
            "next_cursor": page.next.map(encode_cursor),
        }),
    ))
}

/// `GET /api/v1/documents/{id}`.
pub async fn get(ctx: Ctx, id: String) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let id = document_id(&id)?;
    let document = ctx
        .state
        .store
        .get_document(principal.user_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("document"))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "document": DocumentView::from(&document) }),
    ))
}

/// `DELETE /api/v1/documents/{id}`: the row, its chunks and its blob; a running ingestion stops.
pub async fn delete(ctx: Ctx, id: String) -> Result<Response, ApiError> {
    let principal = ctx.authenticate()?;
    let id = document_id(&id)?;
    ctx.state
        .homes
        .delete_document(principal.user_id, id)
        .await
        .map_err(|e| ApiError::from_session(e, "document"))?;
    Ok(no_content())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_lose_their_directories() {
        assert_eq!(file_name(Some("a/b/c.pdf")).unwrap(), "c.pdf");
        assert_eq!(file_name(Some("C:\\docs\\x.md")).unwrap(), "x.md");
        assert!(file_name(Some("dir/")).is_err());
        assert!(file_name(None).is_err());
        assert!(file_name(Some("a\u{7}b")).is_err());
        assert!(file_name(Some(&"x".repeat(256))).is_err());
    }

    #[test]
    fn cursors_round_trip() {
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(id)).unwrap(), id);
        assert!(decode_cursor("nope!").is_err());
        assert!(decode_cursor("AAAA").is_err());
    }
}
