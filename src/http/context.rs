//! Per-request plumbing shared by every route: the request id, the client IP, authentication,
//! strict decoding of bodies and query strings, and the wrapper that turns a handler's
//! `Result` into a response carrying `X-Request-Id`, inside a tracing span that puts the request
//! id on every log line.
//!
//! Routes never reject after their path and method matched: every failure becomes an `ApiError`
//! here, so it is answered in the contract's envelope with the request id (a warp rejection would
//! fall through to the next route and lose both).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::Instrument;
use uuid::Uuid;
use warp::Filter;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;

use super::error::{ApiError, ErrorCode};
use crate::app::AppState;
use crate::auth::AccessClaims;
use crate::edge::PeerAddr;

/// Everything a handler needs about the request except its body.
#[derive(Clone)]
pub struct Ctx {
    pub state: Arc<AppState>,
    pub request_id: String,
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub peer: Option<SocketAddr>,
}

/// The authenticated caller, from the access token alone.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: Uuid,
    pub claims: AccessClaims,
}

/// Why reading a request body failed (the connection broke, or it was not valid HTTP).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

pub type BodyStream = futures_util::stream::BoxStream<'static, Result<Bytes, BodyError>>;

/// The request body, read lazily so the size limit applies while reading.
pub struct Body(BodyStream);

impl Body {
    /// The body of a request served without warp's filters (see [`super::Routes`]).
    pub fn incoming(body: hyper::body::Incoming) -> Body {
        Body(
            http_body_util::BodyDataStream::new(body)
                .map(|chunk| chunk.map_err(BodyError::from))
                .boxed(),
        )
    }

    /// The raw stream, for routes that read the body their own way (multipart uploads).
    pub fn into_stream(self) -> BodyStream {
        self.0
    }
}

pub fn ctx(state: Arc<AppState>) -> impl Filter<Extract = (Ctx,), Error = warp::Rejection> + Clone {
    let query = warp::query::raw()
        .map(Some)
        .or(warp::any().map(|| None))
        .unify();
    warp::any()
        .map(move || state.clone())
        .and(warp::method())
        .and(warp::path::full())
        .and(query)
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<PeerAddr>())
        .map(
            |state,
             method,
             path: warp::path::FullPath,
             query,
             headers: HeaderMap,
             peer: Option<PeerAddr>| {
                Ctx::new(
                    state,
                    method,
                    path.as_str().to_owned(),
                    query,
                    headers,
                    peer.map(|PeerAddr(addr)| addr),
                )
            },
        )
        .boxed()
}

pub fn body() -> impl Filter<Extract = (Body,), Error = warp::Rejection> + Clone {
    warp::body::stream().map(|stream: _| Body(into_bytes_stream(stream)))
}

fn into_bytes_stream<S, B>(stream: S) -> BodyStream
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: Buf + Send + 'static,
{
    stream
        .map(|chunk| {
            chunk
                .map(|mut buf| buf.copy_to_bytes(buf.remaining()))
                .map_err(BodyError::from)
        })
        .boxed()
}

/// Echo a client's id when it is sane (printable, bounded), else mint a UUIDv7.
fn request_id_from(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::now_v7().to_string())
}

impl Ctx {
    /// The request's context; its id is the client's `X-Request-Id` when usable.
    pub fn new(
        state: Arc<AppState>,
        method: Method,
        path: String,
        query: Option<String>,
        headers: HeaderMap,
        peer: Option<SocketAddr>,
    ) -> Ctx {
        let request_id = request_id_from(&headers);
        Ctx {
            state,
            request_id,
            method,
            path,
            query,
            headers,
            peer,
        }
    }

    /// The client address used for per-IP limits.
    pub fn client_ip(&self) -> Option<IpAddr> {
        if self.state.config.server.trust_forwarded_for
            && let Some(ip) = self
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|first| first.trim().parse().ok())
        {
            return Some(ip);
        }
        self.peer.map(|p| p.ip())
    }

    /// Verifies `Authorization: Bearer <jwt>` without touching the store.
    pub fn authenticate(&self) -> Result<Principal, ApiError> {
        let token = bearer_token(&self.headers).ok_or_else(|| {
            ApiError::unauthenticated("missing `Authorization: Bearer <access token>` header")
        })?;
        let claims = self.state.jwt.verify_access(token)?;
        Ok(Principal {
            user_id: claims.sub,
            claims,
        })
    }

    /// Verifies a token given outside the header (`?access_token=` for EventSource/WebSocket).
    pub fn authenticate_token(&self, token: &str) -> Result<Principal, ApiError> {
        let claims = self.state.jwt.verify_access(token)?;
        Ok(Principal {
            user_id: claims.sub,
            claims,
        })
    }

    /// Decodes the query string into `T`, naming the offending parameter on error.
    pub fn query<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let raw = self.query.as_deref().unwrap_or("");
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(raw.as_bytes()));
        serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let param = err.path().to_string();
            let inner = err.into_inner().to_string();
            if param == "." {
                ApiError::validation(format!("query string: {inner}"))
            } else {
                ApiError::field(&param, inner)
            }
        })
    }

    /// Reads the body (up to the configured limit) and decodes it as JSON into `T`.
    /// An empty body decodes as `{}`, so routes whose fields are all optional accept no body.
    pub async fn json<T: DeserializeOwned>(&self, body: Body) -> Result<T, ApiError> {
        let bytes = self.read_body(body).await?;
        self.decode_json(&bytes)
    }

    /// Decodes a body already read (see [`Ctx::read_body`]) as [`Ctx::json`] does.
    pub fn decode_json<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, ApiError> {
        let bytes: &[u8] = match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => b"{}",
            Some(first) => {
                self.require_json_content_type()?;
                // Derived structs would also accept a JSON array as positional fields; the
                // contract's bodies are objects.
                if *first != b'{' && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
                {
                    return Err(ApiError::validation("request body must be a JSON object"));
                }
                bytes
            }
        };
        // The usual, valid body: plain serde_json. Only a refused one is read again with
        // serde_path_to_error, to name the field in the error (it costs on every request).
        if let Ok(value) = serde_json::from_slice(bytes) {
            return Ok(value);
        }
        let mut deserializer = serde_json::Deserializer::from_slice(bytes);
        let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
            let field = err.path().to_string();
            let inner = err.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                ApiError::validation(format!("malformed JSON: {inner}"))
            } else if field == "." {
                ApiError::validation(format!("invalid body: {inner}"))
            } else {
                ApiError::field(&field, inner.to_string())
            }
        })?;
        deserializer
            .end()
            .map_err(|e| ApiError::validation(format!("malformed JSON: {e}")))?;
        Ok(value)
    }

    fn require_json_content_type(&self) -> Result<(), ApiError> {
        let content_type = self
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = content_type.split(';').next().unwrap_or("").trim();
        if mime.eq_ignore_ascii_case("application/json") {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                if mime.is_empty() {
                    "missing Content-Type; send application/json".to_owned()
                } else {
                    format!("unsupported Content-Type `{mime}`; send application/json")
                },
            ))
        }
    }

    /// The raw body, up to the configured limit (413 beyond it).
    pub async fn read_body(&self, body: Body) -> Result<Bytes, ApiError> {
        let limit = self.state.config.server.body_limit_bytes;
        let too_large = || {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("request body exceeds the limit of {limit} bytes"),
            )
            .with_details(json!({ "limit_bytes": limit }))
        };
        let declared = self
            .headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit) {
            return Err(too_large());
        }
        let mut stream = body.0;
        let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(limit) as usize);
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::validation(format!("reading request body: {e}")))?;
            if (buf.len() + chunk.len()) as u64 > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
        Some(token.trim())
    } else {
        None
    }
}

/// Runs a handler inside the request's span, maps its error, stamps `X-Request-Id` and logs one
/// access line (method, path, status, latency — never bodies, tokens or query strings).
pub async fn respond<F, Fut>(ctx: Ctx, handler: F) -> Response
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    respond_with(ctx, handler, ApiError::into_response).await
}

/// [`respond`] with another error rendering (the OpenAI-compatible routes use OpenAI's shape).
pub async fn respond_with<F, Fut>(
    ctx: Ctx,
    handler: F,
    render: fn(ApiError, &str) -> Response,
) -> Response
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Result<Response, ApiError>>,
{
    let request_id = ctx.request_id.clone();
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %ctx.method,
        path = %ctx.path,
    );
    let metrics = ctx.state.metrics.clone();
    let labels = super::metrics::RequestLabels::of(&ctx.method, &ctx.path);
    async move {
        let started = Instant::now();
        let _in_flight = metrics.begin_request();
        let mut response = match handler(ctx).await {
            Ok(response) => response,
            Err(error) => render(error, &request_id),
        };
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert("x-request-id", value);
        }
        let status = response.status();
        let elapsed = started.elapsed();
        labels.record(status, elapsed);
        let latency_ms = elapsed.as_secs_f64() * 1000.0;
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), latency_ms, "request finished");
        } else {
            tracing::info!(status = status.as_u16(), latency_ms, "request finished");
        }
        response
    }
    .instrument(span)
    .await
}

/// A JSON response with a status.
pub fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    use warp::Reply;
    warp::reply::with_status(warp::reply::json(value), status).into_response()
}

pub fn no_content() -> Response {
    use warp::Reply;
    warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response()
}
