//! The one error type of the native API and its one mapping to HTTP (API.md, Conventions).
//!
//! Handlers return `Result<Response, ApiError>`; [`ApiError::into_response`] writes the envelope
//! `{"error": {code, message, details, request_id}}`. Internal causes are logged with their full
//! chain; the body only says what a client can act on.

use std::time::Duration;

use chorus_actors::quota::Admission;
use chorus_actors::session::SessionError;
use chorus_actors::store::StoreError;
use serde_json::{Value, json};
use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;

use crate::auth::AuthError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Validation,
    Unauthenticated,
    Forbidden,
    NotFound,
    Conflict,
    PayloadTooLarge,
    UnsupportedMediaType,
    RateLimited,
    QuotaExceeded,
    ProviderError,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Validation => "VALIDATION_ERROR",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::QuotaExceeded => "QUOTA_EXCEEDED",
            ErrorCode::ProviderError => "PROVIDER_ERROR",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Validation => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::RateLimited | ErrorCode::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::ProviderError => StatusCode::BAD_GATEWAY,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Option<Value>,
    /// Set for 429s: becomes `Retry-After` and the `X-RateLimit-*` headers.
    pub rate_limit: Option<Admission>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            details: None,
            rate_limit: None,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Validation, message)
    }

    /// A validation error about one named field.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::new(ErrorCode::Validation, format!("{field}: {message}"))
            .with_details(json!({ "field": field }))
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthenticated, message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{what} not found"))
    }

    pub fn rate_limited(decision: impl Into<Admission>, message: impl Into<String>) -> Self {
        ApiError {
            rate_limit: Some(decision.into()),
            ..Self::new(ErrorCode::RateLimited, message)
        }
    }

    /// Logs the cause chain and answers a generic 500.
    pub fn internal(context: &str, cause: &dyn std::error::Error) -> Self {
        tracing::error!(error = %error_chain(cause), "{context}");
        Self::new(ErrorCode::Internal, "internal error")
    }

    pub fn into_response(self, request_id: &str) -> Response {
        let body = json!({
            "error": {
                "code": self.code.as_str(),
                "message": self.message,
                "details": self.details,
                "request_id": request_id,
            }
        });
        let mut response =
            warp::reply::with_status(warp::reply::json(&body), self.code.status()).into_response();
        if self.code == ErrorCode::PayloadTooLarge {
            // The rest of the body was not read, so the connection cannot carry another request;
            // say so, or a keep-alive client would send its next request into a closed socket.
            response
                .headers_mut()
                .insert("connection", HeaderValue::from_static("close"));
        }
        if let Some(decision) = self.rate_limit {
            set_rate_limit_headers(&mut response, &decision);
            response.headers_mut().insert(
                "retry-after",
                HeaderValue::from(retry_secs(decision.retry_after)),
            );
        }
        response
    }
}

use warp::Reply as _;

/// `X-RateLimit-Limit/Remaining/Reset` (reset in seconds until the bucket is full).
pub fn set_rate_limit_headers(response: &mut Response, decision: &(impl Into<Admission> + Copy)) {
    let decision: Admission = (*decision).into();
    let headers = response.headers_mut();
    headers.insert("x-ratelimit-limit", HeaderValue::from(decision.limit));
    headers.insert(
        "x-ratelimit-remaining",
        HeaderValue::from(decision.remaining),
    );
    headers.insert(
        "x-ratelimit-reset",
        HeaderValue::from(ceil_secs(decision.reset_after)),
    );
}

/// `Retry-After` in whole seconds, at least 1.
pub fn retry_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil() as u64
}

pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict(what) => ApiError::new(ErrorCode::Conflict, what),
            other => ApiError::internal("store error", &other),
        }
    }
}

impl ApiError {
    /// A session error where "not found" names what was missing (`thread`, `api key`, …);
    /// everything else maps as `From<SessionError>` does.
    pub fn from_session(error: SessionError, what: &str) -> Self {
        match error {
            SessionError::NotFound => ApiError::not_found(what),
            other => other.into(),
        }
    }

    /// Adds one entry to `details` (turning it into an object if needed), keeping the rest.
    pub fn with_detail(mut self, key: &str, value: Value) -> Self {
        let mut details = match self.details.take() {
            Some(Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        details.insert(key.to_owned(), value);
        self.details = Some(Value::Object(details));
        self
    }
}

impl From<SessionError> for ApiError {
    fn from(error: SessionError) -> Self {
        match error {
            SessionError::NotFound => ApiError::new(ErrorCode::NotFound, "not found"),
            SessionError::DocumentNotFound => ApiError::not_found("document"),
            SessionError::Store(store) => store.into(),
            SessionError::Conflict(what) => ApiError::new(ErrorCode::Conflict, what),
            SessionError::Invalid(what) => ApiError::validation(what),
            SessionError::Provider(e) => crate::http::messages::provider_error(&e),
            SessionError::Forbidden(why) => ApiError::new(ErrorCode::Forbidden, why),
            SessionError::TooLarge { what, limit } => ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("{what} exceeds your plan's upload limit of {limit} bytes"),
            )
            .with_details(json!({ "limit_bytes": limit })),
            SessionError::RateLimited {
                what,
                limit,
                remaining,
                retry_after,
                reset_after,
            } => {
                let admission = Admission {
                    allowed: false,
                    limit,
                    remaining,
                    retry_after,
                    reset_after,
                };
                ApiError::rate_limited(
                    admission,
                    format!("rate limit of your plan reached ({limit} {what}); retry later"),
                )
                .with_details(json!({
                    "what": what,
                    "limit": limit,
                    "remaining": remaining,
                    "retry_after": retry_secs(retry_after),
                }))
            }
            SessionError::QuotaExceeded {
                what,
                limit,
                used,
                resets_at,
            } => {
                let until_reset = (resets_at - chrono::Utc::now())
                    .to_std()
                    .unwrap_or(Duration::ZERO);
                ApiError {
                    rate_limit: Some(Admission {
                        allowed: false,
                        limit,
                        remaining: 0,
                        retry_after: until_reset,
                        reset_after: until_reset,
                    }),
                    ..ApiError::new(
                        ErrorCode::QuotaExceeded,
                        format!(
                            "monthly {what} quota of your plan used up ({used} of {limit}); it resets at {}",
                            resets_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        ),
                    )
                }
                .with_details(json!({
                    "what": what,
                    "limit": limit,
                    "used": used,
                    "resets_at": resets_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                }))
            }
            unavailable @ SessionError::Unavailable(_) => {
                tracing::warn!(error = %unavailable, "user session unavailable");
                ApiError::new(
                    ErrorCode::Unavailable,
                    "temporarily unavailable, retry shortly",
                )
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::MissingToken => ApiError::unauthenticated("missing bearer token"),
            AuthError::Expired => ApiError::unauthenticated("access token expired"),
            AuthError::InvalidToken(why) => {
                ApiError::unauthenticated(format!("invalid access token: {why}"))
            }
            other @ (AuthError::Keys(_) | AuthError::Hashing(_)) => {
                ApiError::internal("auth error", &other)
            }
        }
    }
}
