//! The HTTP edge (warp 0.4): routes of API.md, one error envelope, CORS, request ids.
//!
//! Each route matches path and method, then hands a [`Ctx`] (and the body, for writes) to its
//! handler through [`respond`]. Anything no route matched gets the envelope's 404 from the last,
//! catch-all route, so every response — errors included — carries `X-Request-Id`.

mod admin;
mod auth_routes;
mod billing;
pub mod context;
mod documents;
pub mod error;
mod me;
pub mod messages;
pub mod metrics;
mod models;
mod openai;
mod ops;
mod patch;
mod search;
mod threads;
mod validate;
mod views;
mod ws;

use std::convert::Infallible;
use std::sync::Arc;

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, Method};
use warp::reply::Response;

use crate::app::AppState;
use crate::config::CorsOrigins;
use context::{Body, Ctx, body, respond, respond_with};
use error::{ApiError, ErrorCode};

/// What the edge serves (`crate::edge`): `POST /v1/chat/completions`, the high-rate route, is
/// served directly; every other request goes through warp's filters ([`routes`]).
///
/// Why the direct route: at a moderate rate every request runs in cold caches, so its cost
/// grows with the code it touches. Through the filters, a completion request walked the `or`
/// chain, cloned its headers and boxed its body stream through several adapters; in the CPU
/// profile at 1,000 requests/s (load-tests/README.md, session 7) warp's filters and the context
/// extraction were about 9% of Chorus's CPU. The direct route runs the same handler through the
/// same [`context::respond_with`] (request id, span, metrics, access log, error envelope).
///
/// A request with an `Origin` header still takes the filters, so CORS applies as before.
#[derive(Clone)]
pub struct Routes {
    filter: BoxedFilter<(Response,)>,
    state: Option<Arc<AppState>>,
}

/// A request being answered by the direct route.
pub type DirectResponse = futures_util::future::BoxFuture<'static, Response>;

impl Routes {
    /// The application's routes.
    pub fn new(state: Arc<AppState>) -> Routes {
        Routes {
            filter: routes(state.clone()),
            state: Some(state),
        }
    }

    /// Only `filter`, with no direct route.
    pub fn filter_only(filter: BoxedFilter<(Response,)>) -> Routes {
        Routes {
            filter,
            state: None,
        }
    }

    /// The filters, for requests the direct route does not take.
    pub fn filter(&self) -> BoxedFilter<(Response,)> {
        self.filter.clone()
    }

    /// Answers `request` by the direct route when it is one, or gives it back.
    // The request is handed back by value: boxing it would allocate for every other request.
    #[allow(clippy::result_large_err)]
    pub fn direct(
        &self,
        request: http::Request<hyper::body::Incoming>,
        peer: std::net::SocketAddr,
    ) -> Result<DirectResponse, http::Request<hyper::body::Incoming>> {
        let Some(state) = &self.state else {
            return Err(request);
        };
        if request.method() != Method::POST
            || request.uri().path() != "/v1/chat/completions"
            || request.headers().contains_key(http::header::ORIGIN)
        {
            return Err(request);
        }
        let (parts, body) = request.into_parts();
        let ctx = Ctx::new(
            state.clone(),
            parts.method,
            parts.uri.path().to_owned(),
            parts.uri.query().map(str::to_owned),
            parts.headers,
            Some(peer),
        );
        let body = Body::incoming(body);
        Ok(Box::pin(respond_with(
            ctx,
            move |c| openai::chat_completions(c, body),
            openai::openai_error,
        )))
    }
}

/// Every route of the native API, with CORS applied and rejections answered in the envelope.
pub fn routes(state: Arc<AppState>) -> BoxedFilter<(Response,)> {
    let cors = state.config.server.cors.clone();
    let ctx = context::ctx(state);

    let ops = warp::path!("healthz")
        .and(warp::get())
        .and(ctx.clone())
        .then(|c| respond(c, ops::healthz))
        .or(warp::path!("readyz")
            .and(warp::get())
            .and(ctx.clone())
            .then(|c| respond(c, ops::readyz)))
        .unify()
        .or(warp::path!("metrics")
            .and(warp::get())
            .and(ctx.clone())
            .then(|c| respond(c, metrics::serve)))
        .unify()
        .boxed();

    let admin = warp::path!("api" / "v1" / "admin" / "users" / String)
        .and(warp::patch())
        .and(ctx.clone())
        .and(body())
        .then(|id, c, b| respond(c, move |c| admin::patch_user(c, id, b)))
        .or(warp::path!("api" / "v1" / "admin" / "providers")
            .and(warp::get())
            .and(ctx.clone())
            .then(|c| respond(c, admin::providers)))
        .unify()
        .or(warp::path!("api" / "v1" / "admin" / "cluster")
            .and(warp::get())
            .and(ctx.clone())
            .then(|c| respond(c, admin::cluster)))
        .unify()
        .or(warp::path!("api" / "v1" / "billing" / "webhook")
            .and(warp::post())
            .and(ctx.clone())
            .and(body())
            .then(|c, b| with_body(c, b, billing::webhook)))
        .unify()
        .boxed();

    let auth = warp::path!("api" / "v1" / "auth" / "register")
        .and(warp::post())
        .and(ctx.clone())
        .and(body())
        .then(|c, b| with_body(c, b, auth_routes::register))
        .or(warp::path!("api" / "v1" / "auth" / "login")
            .and(warp::post())
            .and(ctx.clone())
            .and(body())
            .then(|c, b| with_body(c, b, auth_routes::login)))
        .unify()
        .or(warp::path!("api" / "v1" / "auth" / "refresh")
            .and(warp::post())
            .and(ctx.clone())
            .and(body())
            .then(|c, b| with_body(c, b, auth_routes::refresh)))
        .unify()
        .or(warp::path!("api" / "v1" / "auth" / "logout")
            .and(warp::post())
            .and(ctx.clone())
            .and(body())
            .then(|c, b| with_body(c, b, auth_routes::logout)))
        .unify()
        .boxed();

    let me = warp::path!("api" / "v1" / "me")
        .and(warp::get())
        .and(ctx.clone())
        .then(|c| respond(c, me::get_me))
        .or(warp::path!("api" / "v1" / "me")
            .and(warp::patch())
            .and(ctx.clone())
            .and(body())
            .then(|c, b| with_body(c, b, me::patch_me)))
        .unify()
        .or(warp::path!("api" / "v1" / "me" / "usage")
            .and(warp::get())
            .and(ctx.clone())
            .then(|c| respond(c, me::get_usage)))
        .unify()
        .or(warp::path!("api" / "v1" / "me" / "api-keys")
            .and(warp::post())
            .and(ctx.clone())
            .and(body())
            .then(|c, b| with_body(c, b, me::create_api_key)))
        .unify()
        .or(warp::path!("api" / "v1" / "me" / "api-keys")
            .and(warp::get())
            .and(ctx.clone())
            .then(|c| respond(c, me::list_api_keys)))
        .unify()
        .or(warp::path!("api" / "v1" / "me" / "api-keys" / String)
            .and(warp::delete())
            .and(ctx.clone())
            .then(|id, c| respond(c, move |c| me::delete_api_key(c, id))))
        .unify()
        .or(warp::path!("api" / "v1" / "me" / "provider-keys")
            .and(warp::get())
            .and(ctx.clone())
            .then(|c| respond(c, me::list_provider_keys)))
        .unify()
        .or(warp::path!("api" / "v1" / "me" / "provider-keys" / String)
            .and(warp::put())
            .and(ctx.clone())
            .and(body())
            .then(|p, c, b| respond(c, move |c| me::put_provider_key(c, p, b))))
        .unify()
        .or(warp::path!("api" / "v1" / "me" / "provider-keys" / String)
            .and(warp::delete())
            .and(ctx.clone())
            .then(|p, c| respond(c, move |c| me::delete_provider_key(c, p))))
        .unify()
        .boxed();

    let threads = warp::path!("api" / "v1" / "threads")
        .and(warp::get())
        .and(ctx.clone())
        .then(|c| respond(c, threads::list))
        .or(warp::path!("api" / "v1" / "threads")
            .and(warp::post())
            .and(ctx.clone())
            .and(body())
            .then(|c, b| with_body(c, b, threads::create)))
        .unify()
        .or(warp::path!("api" / "v1" / "threads" / String)
            .and(warp::get())
            .and(ctx.clone())
            .then(|id, c| respond(c, move |c| threads::get(c, id))))
        .unify()
        .or(warp::path!("api" / "v1" / "threads" / String)
            .and(warp::patch())
            .and(ctx.clone())
            .and(body())
            .then(|id, c, b| respond(c, move |c| threads::patch(c, id, b))))
        .unify()
        .or(warp::path!("api" / "v1" / "threads" / String)
            .and(warp::delete())
            .and(ctx.clone())
            .then(|id, c| respond(c, move |c| threads::delete(c, id))))
        .unify()
        .or(warp::path!("api" / "v1" / "threads" / String / "messages")
            .and(warp::get())
            .and(ctx.clone())
            .then(|id, c| respond(c, move |c| threads::list_messages(c, id))))
        .unify()
        .boxed();

    let turns = warp::path!("api" / "v1" / "threads" / String / "messages")
        .and(warp::post())
        .and(ctx.clone())
        .and(body())
        .then(|id, c, b| respond(c, move |c| messages::send(c, id, b)))
        .or(warp::path!("api" / "v1" / "threads" / String / "events")
            .and(warp::get())
            .and(ctx.clone())
            .then(|id, c| respond(c, move |c| messages::events(c, id))))
        .unify()
        .or(
            warp::path!("api" / "v1" / "threads" / String / "turns" / String / "cancel")
                .and(warp::post())
                .and(ctx.clone())
                .then(|id, turn, c| respond(c, move |c| messages::cancel(c, id, turn))),
        )
        .unify()
        .or(warp::path!("api" / "v1" / "threads" / String / "summarize")
            .and(warp::post())
            .and(ctx.clone())
            .and(body())
            .then(|id, c, b| respond(c, move |c| messages::summarize(c, id, b))))
        .unify()
        .or(warp::path!("api" / "v1" / "models")
            .and(warp::get())
            .and(ctx.clone())
            .then(|c| respond(c, models::list)))
        .unify()
        .or(warp::path!("api" / "v1" / "ws")
            .and(warp::get())
            .and(ctx.clone())
            .and(warp::ws())
            .then(|c, ws| respond(c, move |c| ws::upgrade(c, ws))))
        .unify()
        .boxed();

    let documents = warp::path!("api" / "v1" / "documents")
        .and(warp::post())
        .and(ctx.clone())
        .and(body())
        .then(|c, b| with_body(c, b, documents::upload))
        .or(warp::path!("api" / "v1" / "documents")
            .and(warp::get())
            .and(ctx.clone())
            .then(|c| respond(c, documents::list)))
        .unify()
        .or(warp::path!("api" / "v1" / "documents" / String)
            .and(warp::get())
            .and(ctx.clone())
            .then(|id, c| respond(c, move |c| documents::get(c, id))))
        .unify()
        .or(warp::path!("api" / "v1" / "documents" / String)
            .and(warp::delete())
            .and(ctx.clone())
            .then(|id, c| respond(c, move |c| documents::delete(c, id))))
        .unify()
        .or(warp::path!("api" / "v1" / "search")
            .and(warp::post())
            .and(ctx.clone())
            .and(body())
            .then(|c, b| respond(c, move |c| search::search(c, b))))
        .unify()
        .boxed();

    let openai_api = warp::path!("v1" / "chat" / "completions")
        .and(warp::post())
        .and(ctx.clone())
        .and(body())
        .then(|c, b| {
            respond_with(
                c,
                move |c| openai::chat_completions(c, b),
                openai::openai_error,
            )
        })
        .or(warp::path!("v1" / "models")
            .and(warp::get())
            .and(ctx.clone())
            .then(|c| respond_with(c, openai::list_models, openai::openai_error)))
        .unify()
        .or(warp::path!("v1" / "embeddings")
            .and(warp::post())
            .and(ctx.clone())
            .and(body())
            .then(|c, b| respond_with(c, move |c| openai::embeddings(c, b), openai::openai_error)))
        .unify()
        .boxed();

    let fallback = ctx.then(|c: Ctx| {
        respond(c, |c| async move {
            Err::<Response, _>(ApiError::new(
                ErrorCode::NotFound,
                format!("no route for {} {}", c.method, c.path),
            ))
        })
    });

    // Routes are tried in order: the OpenAI-compatible API is the high-rate path, so it comes
    // right after the health checks.
    let app = ops
        .or(openai_api)
        .unify()
        .or(auth)
        .unify()
        .or(me)
        .unify()
        .or(threads)
        .unify()
        .or(turns)
        .unify()
        .or(documents)
        .unify()
        .or(admin)
        .unify()
        .or(fallback)
        .unify();

    match cors_filter(&cors) {
        Some(cors) => app
            .with(cors)
            .map(warp::Reply::into_response)
            .recover(answer_rejection)
            .unify()
            .boxed(),
        None => app.recover(answer_rejection).unify().boxed(),
    }
}

async fn with_body<F, Fut>(ctx: Ctx, body: Body, handler: F) -> Response
where
    F: FnOnce(Ctx, Body) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    respond(ctx, move |c| handler(c, body)).await
}

fn cors_filter(origins: &CorsOrigins) -> Option<warp::cors::Builder> {
    let builder = warp::cors()
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            "authorization",
            "content-type",
            "x-request-id",
            "last-event-id",
        ])
        .expose_headers([
            "x-request-id",
            "retry-after",
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ])
        .max_age(600);
    match origins {
        CorsOrigins::None => None,
        CorsOrigins::Any => Some(builder.allow_any_origin()),
        CorsOrigins::List(list) => Some(builder.allow_origins(list.iter().map(String::as_str))),
    }
}

/// Only CORS refusals (a preflight from an origin or with a header not allowed) reach here:
/// every route answers its own errors, and the catch-all matches everything else.
async fn answer_rejection(rejection: warp::Rejection) -> Result<Response, Infallible> {
    let request_id = uuid::Uuid::now_v7().to_string();
    let error = if rejection.find::<warp::cors::CorsForbidden>().is_some() {
        ApiError::new(
            ErrorCode::Forbidden,
            "CORS request not allowed for this origin",
        )
    } else {
        tracing::warn!(?rejection, "unhandled rejection");
        ApiError::new(ErrorCode::NotFound, "not found")
    };
    let mut response = error.into_response(&request_id);
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    Ok(response)
}

/// Email validation shared with the CLI (`chorus user create`).
pub fn validate_email(raw: &str) -> anyhow::Result<String> {
    validate::email(raw).map_err(|e| anyhow::anyhow!(e.message))
}
