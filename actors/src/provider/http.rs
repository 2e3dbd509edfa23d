//! The HTTP client of provider calls.
//!
//! Calls go through hyper's pooled client (`hyper_util`'s, the same one `reqwest` wraps) called
//! directly. `reqwest` puts a redirect layer, a retry layer and URL handling around it that
//! cost more CPU than the call itself: measured against the mock upstream on this project's
//! 2-core machine, 21–22 µs of client CPU per request through `reqwest` against 9.5–10.4 µs
//! through this client. Provider APIs do not redirect, and the routing layer does the retrying.
//!
//! A destination that the system's proxy settings (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`,
//! `NO_PROXY`, as `reqwest` reads them) send through a proxy is called through `reqwest`,
//! which speaks to proxies; everything else goes direct.
//!
//! Timeouts are `reqwest`'s: a connect timeout, and a read timeout that bounds the wait for the
//! response head and for each piece of the body.
//!
//! Connections are pooled per *lane*. The HTTP edge serves each client connection on one thread
//! of its own (`src/edge.rs`); such a thread calls [`serve_on_lane`] once, and the calls made
//! from it then use connections owned by that thread, so a request and its upstream call never
//! wake another thread (Envoy's worker threads keep their own upstream pools for the same
//! reason). Every other thread (the actors' runtime) shares one pool. On a lane, calls to
//! plain-`http://` upstreams go further: the calling task drives the connection itself
//! ([`lane`]).

use std::cell::Cell;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioExecutor;
use rustls_platform_verifier::BuilderVerifierExt;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::crypto::aws_lc_rs;

mod lane;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
type Direct = Client<Connector, Full<Bytes>>;

/// Lanes with a pool of their own; threads on higher lanes share the common pool.
const LANES: usize = 64;

thread_local! {
    static LANE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Marks the calling thread as the one serving `lane`: calls made from it use connections of
/// that lane's pool. Call it once per thread, from the thread that runs the lane's runtime;
/// two threads on one lane would share connections across threads again.
pub fn serve_on_lane(lane: usize) {
    LANE.with(|l| l.set(lane));
}

/// How long a connection may take to open, and the longest silence while reading an answer.
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    pub connect: Duration,
    pub read: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        HttpTimeouts {
            connect: Duration::from_secs(10),
            read: Duration::from_secs(120),
        }
    }
}

/// A failed call: the request could not be sent, or the answer could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct HttpError {
    pub message: String,
    /// A connect or read timeout passed.
    pub timeout: bool,
}

impl HttpError {
    fn timeout(what: &str, after: Duration) -> HttpError {
        HttpError {
            message: format!("{what} timed out after {after:?}"),
            timeout: true,
        }
    }

    pub(crate) fn from_error(what: &str, error: &(dyn std::error::Error + 'static)) -> HttpError {
        // The causes say what happened ("connection refused"); the top level rarely does.
        let mut message = format!("{what}: {error}");
        let mut source = error.source();
        let mut timeout = false;
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            timeout |= cause
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
            source = cause.source();
        }
        HttpError { message, timeout }
    }

    fn from_reqwest(error: &reqwest::Error) -> HttpError {
        HttpError {
            timeout: error.is_timeout(),
            ..HttpError::from_error("request through the proxy failed", error)
        }
    }
}

/// The providers' HTTP client. Cheap to clone (the pools are shared).
#[derive(Clone)]
pub struct HttpClient {
    /// The pool of threads without a lane.
    direct: Direct,
    lanes: Arc<[Lane]>,
    connector: Connector,
    /// The plain-TCP part of `connector` (for [`lane`]).
    tcp: HttpConnector,
    /// For destinations behind a proxy (see the module doc).
    proxied: reqwest::Client,
    proxies: Arc<Matcher>,
    read_timeout: Duration,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("read_timeout", &self.read_timeout)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// HTTP/1.1 and HTTP/2 (by ALPN) over TLS verified against the system's roots, or plain
    /// HTTP; with the system's proxy settings.
    pub fn new(timeouts: HttpTimeouts) -> Result<HttpClient, HttpError> {
        HttpClient::with_proxies(timeouts, Matcher::from_system())
    }

    /// [`HttpClient::new`] with the proxy settings given (tests).
    pub fn with_proxies(timeouts: HttpTimeouts, proxies: Matcher) -> Result<HttpClient, HttpError> {
        let tls = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_platform_verifier())
            .map_err(|e| HttpError::from_error("TLS setup", &e))?
            .with_no_client_auth();
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(timeouts.connect));
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(tcp.clone());
        let direct = Client::builder(TokioExecutor::new()).build(connector.clone());
        let proxied = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .read_timeout(timeouts.read)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| HttpError::from_reqwest(&e))?;
        Ok(HttpClient {
            direct,
            lanes: (0..LANES).map(|_| Lane::default()).collect(),
            connector,
            tcp,
            proxied,
            proxies: Arc::new(proxies),
            read_timeout: timeouts.read,
        })
    }

    /// A client with default timeouts, no proxy and the system's roots (the adapters' tests).
    #[cfg(test)]
    pub(crate) fn for_tests() -> HttpClient {
        match HttpClient::with_proxies(HttpTimeouts::default(), Matcher::builder().build()) {
            Ok(client) => client,
            Err(e) => panic!("building the test HTTP client: {e}"),
        }
    }

    /// The calling thread's lane (see the module doc), if it serves one.
    fn lane(&self) -> Option<&Lane> {
        self.lanes.get(LANE.with(Cell::get))
    }

    /// The pool of the calling thread's lane, else the shared one. A lane's connection tasks are
    /// spawned on the runtime that first calls out from it, which is the lane's own.
    fn pool(&self) -> &Direct {
        match self.lane() {
            Some(lane) => lane.pool.get_or_init(|| {
                Client::builder(TokioExecutor::new()).build(self.connector.clone())
            }),
            None => &self.direct,
        }
    }

    /// A `POST` to `uri` (parsed already: providers parse their endpoints once).
    pub fn post(&self, uri: Uri) -> Post<'_> {
        Post {
            client: self,
            uri: Ok(uri),
            headers: HeaderMap::new(),
            body: Ok(Bytes::new()),
        }
    }

    /// A `POST` to a URL parsed now; an invalid one fails when sent.
    pub fn post_url(&self, url: &str) -> Post<'_> {
        let mut post = self.post(Uri::default());
        post.uri = url.parse::<Uri>().map_err(|e| HttpError {
            message: format!("invalid URL {url:?}: {e}"),
            timeout: false,
        });
        post
    }
}

/// The connections of one lane.
#[derive(Default)]
struct Lane {
    /// For `https://` upstreams: hyper's pooled client, made when the lane first calls one.
    pool: OnceLock<Direct>,
    /// For `http://` upstreams: connections driven by the calling task.
    plain: Arc<lane::LaneConns>,
}

/// A request being built (see [`HttpClient::post`]); it borrows the client (no clone per call).
pub struct Post<'a> {
    client: &'a HttpClient,
    uri: Result<Uri, HttpError>,
    headers: HeaderMap,
    body: Result<Bytes, HttpError>,
}

impl Post<'_> {
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// The body as JSON, with `content-type: application/json`.
    pub fn json<T: serde::Serialize + ?Sized>(mut self, body: &T) -> Self {
        self.body = serde_json::to_vec(body)
            .map(Bytes::from)
            .map_err(|e| HttpError {
                message: format!("encoding the request body: {e}"),
                timeout: false,
            });
        self.headers
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self
    }

    /// Sends it and waits for the response head (within the read timeout).
    pub async fn send(self) -> Result<HttpResponse, HttpError> {
        let client = self.client;
        let uri = self.uri?;
        let body = self.body?;
        let read_timeout = client.read_timeout;
        if client.proxies.intercept(&uri).is_some() {
            let response = client
                .proxied
                .post(uri.to_string())
                .headers(self.headers)
                .body(body)
                .send()
                .await
                .map_err(|e| HttpError::from_reqwest(&e))?;
            return Ok(HttpResponse {
                status: response.status(),
                headers: response.headers().clone(),
                body: Body::Proxied(response),
                read_timeout,
            });
        }
        let plain = uri.scheme() == Some(&http::uri::Scheme::HTTP);
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = self.headers;
        if let Some(lane) = client.lane().filter(|_| plain) {
            let sent = lane.plain.clone().send(&client.tcp, request);
            let (head, body) = tokio::time::timeout(read_timeout, sent)
                .await
                .map_err(|_| HttpError::timeout("waiting for the response", read_timeout))??
                .into_parts();
            return Ok(HttpResponse {
                status: head.status,
                headers: head.headers,
                body: Body::Driven(body),
                read_timeout,
            });
        }
        let response = tokio::time::timeout(read_timeout, client.pool().request(request))
            .await
            .map_err(|_| HttpError::timeout("waiting for the response", read_timeout))?
            .map_err(|e| HttpError::from_error("sending the request failed", &e))?;
        let (head, body) = response.into_parts();
        Ok(HttpResponse {
            status: head.status,
            headers: head.headers,
            body: Body::Direct(body),
            read_timeout,
        })
    }
}

enum Body {
    Direct(hyper::body::Incoming),
    Driven(lane::DrivenBody),
    Proxied(reqwest::Response),
}

/// A response whose head arrived; the body is read with [`HttpResponse::bytes`] or
/// [`HttpResponse::bytes_stream`].
pub struct HttpResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Body,
    read_timeout: Duration,
}

/// The body's pieces as they arrive.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, HttpError>> + Send>>;

impl HttpResponse {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The whole body.
    pub async fn bytes(self) -> Result<Bytes, HttpError> {
        let mut stream = self.bytes_stream();
        let Some(first) = stream.next().await.transpose()? else {
            return Ok(Bytes::new());
        };
        let Some(second) = stream.next().await.transpose()? else {
            // Usually the whole answer comes in one piece: no copy.
            return Ok(first);
        };
        let mut whole = Vec::with_capacity(first.len() + second.len());
        whole.extend_from_slice(&first);
        whole.extend_from_slice(&second);
        while let Some(piece) = stream.next().await.transpose()? {
            whole.extend_from_slice(&piece);
        }
        Ok(Bytes::from(whole))
    }

    /// The body's pieces, each within the read timeout.
    pub fn bytes_stream(self) -> ByteStream {
        let read_timeout = self.read_timeout;
        match self.body {
            Body::Proxied(response) => response
                .bytes_stream()
                .map(|piece| piece.map_err(|e| HttpError::from_reqwest(&e)))
                .boxed(),
            Body::Direct(body) => frames(body, read_timeout),
            Body::Driven(body) => frames(body, read_timeout),
        }
    }
}

/// A hyper body's data pieces, each within `read_timeout`.
fn frames<B>(body: B, read_timeout: Duration) -> ByteStream
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Unpin + Send + 'static,
{
    futures_util::stream::unfold(Some(body), move |body| async move {
        let mut body = body?;
        loop {
            let frame = match tokio::time::timeout(read_timeout, body.frame()).await {
                Err(_) => {
                    let error = HttpError::timeout("reading the response", read_timeout);
                    return Some((Err(error), None));
                }
                Ok(None) => return None,
                Ok(Some(Err(e))) => {
                    let error = HttpError::from_error("reading the response failed", &e);
                    return Some((Err(error), None));
                }
                Ok(Some(Ok(frame))) => frame,
            };
            // Trailers carry nothing a provider sends; only data counts.
            if let Ok(data) = frame.into_data()
                && !data.is_empty()
            {
                return Some((Ok(data), Some(body)));
            }
        }
    })
    .boxed()
}
