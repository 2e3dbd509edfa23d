//! `GET /metrics` (Prometheus text, optional basic auth) and the per-request HTTP metrics.
//!
//! Requests are labelled by route template (`/api/v1/threads/{id}`), never by raw path, so the
//! number of series stays bounded whatever clients send; a path no template knows is
//! `unmatched`. A new route belongs in the `routes!` list below: it is the one list of
//! templates.
//!
//! The hot path allocates nothing: [`RequestLabels::of`] maps method and path to two indices
//! before the handler runs, and [`RequestLabels::record`] increments series handles cached per
//! (route, method, status), created on first use so that only series that happened are exported.

use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chorus_actors::metrics::{Histogram, IntCounter, TEXT_CONTENT_TYPE, metrics};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use warp::http::{HeaderValue, Method, StatusCode};
use warp::reply::Response;

use super::context::Ctx;
use super::error::ApiError;
use crate::config::BasicAuth;

/// Declares the route templates: `ROUTES[i]` is the label of index `i` (0 is `unmatched`), and
/// `route_index` maps a path's segments to the first template whose pattern they match.
macro_rules! routes {
    ($($template:literal => [$($segment:pat),*]),* $(,)?) => {
        const ROUTES: &[&str] = &["unmatched", $($template),*];

        fn route_index(segments: &[&str]) -> usize {
            let mut index = 0;
            $(
                index += 1;
                if matches!(segments, [$($segment),*]) {
                    return index;
                }
            )*
            0
        }
    };
}

routes! {
    "/healthz" => ["healthz"],
    "/readyz" => ["readyz"],
    "/metrics" => ["metrics"],
    "/ops" => ["ops"],
    "/v1/chat/completions" => ["v1", "chat", "completions"],
    "/v1/models" => ["v1", "models"],
    "/v1/embeddings" => ["v1", "embeddings"],
    "/api/v1/auth/register" => ["api", "v1", "auth", "register"],
    "/api/v1/auth/login" => ["api", "v1", "auth", "login"],
    "/api/v1/auth/refresh" => ["api", "v1", "auth", "refresh"],
    "/api/v1/auth/logout" => ["api", "v1", "auth", "logout"],
    "/api/v1/me" => ["api", "v1", "me"],
    "/api/v1/me/usage" => ["api", "v1", "me", "usage"],
    "/api/v1/me/api-keys" => ["api", "v1", "me", "api-keys"],
    "/api/v1/me/api-keys/{id}" => ["api", "v1", "me", "api-keys", _],
    "/api/v1/me/provider-keys" => ["api", "v1", "me", "provider-keys"],
    "/api/v1/me/provider-keys/{provider}" => ["api", "v1", "me", "provider-keys", _],
    "/api/v1/models" => ["api", "v1", "models"],
    "/api/v1/ws" => ["api", "v1", "ws"],
    "/api/v1/threads" => ["api", "v1", "threads"],
    "/api/v1/threads/{id}" => ["api", "v1", "threads", _],
    "/api/v1/threads/{id}/messages" => ["api", "v1", "threads", _, "messages"],
    "/api/v1/threads/{id}/events" => ["api", "v1", "threads", _, "events"],
    "/api/v1/threads/{id}/turns/{turn_id}/cancel" =>
        ["api", "v1", "threads", _, "turns", _, "cancel"],
    "/api/v1/threads/{id}/summarize" => ["api", "v1", "threads", _, "summarize"],
    "/api/v1/threads/{id}/share" => ["api", "v1", "threads", _, "share"],
    "/api/v1/public/shares/{share_id}" => ["api", "v1", "public", "shares", _],
    "/api/v1/documents" => ["api", "v1", "documents"],
    "/api/v1/documents/{id}" => ["api", "v1", "documents", _],
    "/api/v1/search" => ["api", "v1", "search"],
    "/api/v1/admin/cluster" => ["api", "v1", "admin", "cluster"],
    "/api/v1/admin/providers" => ["api", "v1", "admin", "providers"],
    "/api/v1/admin/users/{id}" => ["api", "v1", "admin", "users", _],
    "/api/v1/billing/webhook" => ["api", "v1", "billing", "webhook"],
}

/// Longest path (in segments) any template has; longer paths are `unmatched` without looking.
const MAX_SEGMENTS: usize = 8;

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "OTHER",
];

/// Statuses with a cached series handle; others take the (bounded, slower) labelled path.
const STATUSES: &[u16] = &[
    101, 200, 201, 202, 204, 304, 400, 401, 403, 404, 405, 409, 413, 415, 429, 500, 502, 503, 504,
];

fn method_index(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::PATCH => 3,
        Method::DELETE => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// The route template of a request path (`unmatched` when no template fits).
pub fn route_template(path: &str) -> &'static str {
    ROUTES[route_of(path)]
}

fn route_of(path: &str) -> usize {
    let Some(rest) = path.strip_prefix('/') else {
        return 0;
    };
    let mut segments = [""; MAX_SEGMENTS];
    let mut count = 0;
    for segment in rest.split('/') {
        if count == MAX_SEGMENTS {
            return 0;
        }
        segments[count] = segment;
        count += 1;
    }
    route_index(&segments[..count])
}

/// Series handles, created on first use.
struct Handles {
    /// Indexed by `(route * METHODS.len() + method) * STATUSES.len() + status`.
    requests: Box<[OnceLock<Option<IntCounter>>]>,
    /// Indexed by route.
    durations: Box<[OnceLock<Option<Histogram>>]>,
}

fn handles() -> &'static Handles {
    static HANDLES: OnceLock<Handles> = OnceLock::new();
    HANDLES.get_or_init(|| Handles {
        requests: (0..ROUTES.len() * METHODS.len() * STATUSES.len())
            .map(|_| OnceLock::new())
            .collect(),
        durations: (0..ROUTES.len()).map(|_| OnceLock::new()).collect(),
    })
}

/// What a request is counted under, computed before its handler runs.
#[derive(Debug, Clone, Copy)]
pub struct RequestLabels {
    route: usize,
    method: usize,
}

impl RequestLabels {
    pub fn of(method: &Method, path: &str) -> RequestLabels {
        RequestLabels {
            route: route_of(path),
            method: method_index(method),
        }
    }

    /// Counts the answered request and observes its latency.
    pub fn record(self, status: StatusCode, elapsed: Duration) {
        let handles = handles();
        let (route, method) = (ROUTES[self.route], METHODS[self.method]);
        match STATUSES.binary_search(&status.as_u16()) {
            Ok(status_index) => {
                let slot =
                    (self.route * METHODS.len() + self.method) * STATUSES.len() + status_index;
                if let Some(Some(counter)) = handles.requests.get(slot).map(|cell| {
                    cell.get_or_init(|| {
                        metrics()
                            .http_requests_total
                            .child([method, route, status.as_str()])
                    })
                }) {
                    counter.inc();
                }
            }
            Err(_) => metrics()
                .http_requests_total
                .inc([method, route, status.as_str()]),
        }
        if let Some(Some(histogram)) = handles
            .durations
            .get(self.route)
            .map(|cell| cell.get_or_init(|| metrics().http_request_duration_seconds.child([route])))
        {
            histogram.observe(elapsed.as_secs_f64());
        }
    }
}

/// `GET /metrics`: the registry in Prometheus text format.
pub async fn serve(ctx: Ctx) -> Result<Response, ApiError> {
    if let Some(expected) = &ctx.state.config.metrics.basic_auth
        && !basic_auth_matches(&ctx, expected)
    {
        let mut response = ApiError::unauthenticated("/metrics needs basic auth credentials")
            .into_response(&ctx.request_id);
        response.headers_mut().insert(
            "www-authenticate",
            HeaderValue::from_static("Basic realm=\"metrics\", charset=\"UTF-8\""),
        );
        return Ok(response);
    }
    let metrics = metrics();
    metrics.sessions_live.set(
        [],
        i64::try_from(ctx.state.sessions.live_count()).unwrap_or(i64::MAX),
    );
    let text = metrics
        .render()
        .map_err(|e| ApiError::internal("rendering metrics", &e))?;
    let mut response = Response::new(text.into());
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static(TEXT_CONTENT_TYPE));
    Ok(response)
}

/// Compares `Authorization: Basic …` with the configured pair in constant time (digests of
/// equal length, so neither content nor length leaks through timing).
fn basic_auth_matches(ctx: &Ctx, expected: &BasicAuth) -> bool {
    let Some(given) = ctx
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .and_then(|(_, encoded)| STANDARD.decode(encoded.trim()).ok())
    else {
        return false;
    };
    let Some(split) = given.iter().position(|b| *b == b':') else {
        return false;
    };
    let (user, password) = (&given[..split], &given[split + 1..]);
    let user_ok = Sha256::digest(user).ct_eq(&Sha256::digest(expected.user.as_bytes()));
    let password_ok =
        Sha256::digest(password).ct_eq(&Sha256::digest(expected.password.expose().as_bytes()));
    bool::from(user_ok & password_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_templates() {
        let cases = [
            ("/healthz", "/healthz"),
            ("/metrics", "/metrics"),
            ("/v1/chat/completions", "/v1/chat/completions"),
            ("/api/v1/me", "/api/v1/me"),
            ("/api/v1/me/api-keys/0190-abc", "/api/v1/me/api-keys/{id}"),
            ("/api/v1/threads/abc", "/api/v1/threads/{id}"),
            (
                "/api/v1/threads/abc/messages",
                "/api/v1/threads/{id}/messages",
            ),
            (
                "/api/v1/threads/a/turns/b/cancel",
                "/api/v1/threads/{id}/turns/{turn_id}/cancel",
            ),
            ("/api/v1/admin/users/u1", "/api/v1/admin/users/{id}"),
            ("/api/v1/billing/webhook", "/api/v1/billing/webhook"),
            ("/api/v1/me/", "unmatched"),
            ("/nope", "unmatched"),
            ("", "unmatched"),
            ("/a/b/c/d/e/f/g/h/i/j", "unmatched"),
        ];
        for (path, template) in cases {
            assert_eq!(route_template(path), template, "{path}");
        }
    }

    #[test]
    fn cached_statuses_are_sorted_for_binary_search() {
        assert!(STATUSES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn templates_are_unique() {
        let unique: std::collections::HashSet<_> = ROUTES.iter().collect();
        assert_eq!(unique.len(), ROUTES.len());
    }
}
