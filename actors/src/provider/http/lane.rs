//! Plain-HTTP/1 upstream connections owned by one lane (an edge thread) and driven by the task
//! that uses them.
//!
//! hyper's pooled client runs every connection as a task of its own: a call hands its request
//! to that task through a channel, the task writes it, reads the answer and hands it back
//! through another channel, the body follows through a third, and the pool is a lock around a
//! map of keys. On a lane, the call and its connection live on one thread anyway, so here the
//! calling task polls the connection itself (hyper's `client::conn::http1`: the same parser
//! and writer), and a lane's idle connections are a short list only its thread touches. A call
//! costs no task switch between it and its connection.
//!
//! Only for `http://` destinations. Over TLS, providers negotiate HTTP/2 by ALPN and share one
//! connection among many calls, which hyper's pooled client does well; a plain-HTTP upstream
//! is a local inference server or gateway (vLLM, Ollama, a sidecar), where the gateway's own
//! microseconds are a visible part of the latency.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HOST, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::HttpError;

type Io = TokioIo<TcpStream>;

/// How long an unused connection is kept (as long as hyper's pooled client keeps them).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Unused connections kept per lane, over all destinations; more are closed.
const MAX_IDLE: usize = 256;

/// One connection to an upstream, with the handle that sends on it.
struct Conn {
    authority: Authority,
    sender: SendRequest<Full<Bytes>>,
    connection: Connection<Io, Full<Bytes>>,
    /// The connection future finished: the peer closed, or the connection failed.
    finished: bool,
    /// Served a call before (a peer may have closed it meanwhile: see [`LaneConns::send`]).
    reused: bool,
    /// When it was last checked in.
    idle_since: Instant,
}

impl Conn {
    /// Lets the connection read and write what it can; notes when it has finished.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.finished && Pin::new(&mut self.connection).poll(cx).is_ready() {
            self.finished = true;
        }
    }

    /// Whether it can take another call now: the peer has not closed it, nothing is left
    /// unread, and hyper's dispatcher is idle. Polled with a waker that does nothing, as the
    /// connection is not yet part of any task.
    fn ready_for_a_call(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop()));
        !self.finished && self.sender.is_ready()
    }
}

/// The unused connections of one lane.
#[derive(Default)]
pub(super) struct LaneConns {
    /// Oldest first. Only the lane's thread locks it, except when a response body is dropped
    /// elsewhere; the lock is uncontended.
    #[expect(
        clippy::vec_box,
        reason = "a connection stays in its box from opening to closing, through bodies and this list"
    )]
    idle: Mutex<Vec<Box<Conn>>>,
}

impl LaneConns {
    /// A ready connection to `authority` (the most recently used), else none.
    fn check_out(&self, authority: &Authority) -> Option<Box<Conn>> {
        let Ok(mut idle) = self.idle.lock() else {
            return None;
        };
        let now = Instant::now();
        let stale = idle
            .iter()
            .take_while(|c| now.duration_since(c.idle_since) >= IDLE_TIMEOUT)
            .count();
        idle.drain(..stale);
        while let Some(position) = idle.iter().rposition(|c| c.authority == *authority) {
            let mut conn = idle.remove(position);
            if conn.ready_for_a_call() {
                return Some(conn);
            }
        }
        None
    }

    fn check_in(&self, mut conn: Box<Conn>) {
        if conn.finished {
            return;
        }
        conn.reused = true;
        conn.idle_since = Instant::now();
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push(conn);
        }
    }

    /// Sends `request` (absolute URI, `http` scheme) on a connection of this lane, opening one
    /// when none is ready. A reused connection the peer closed just before the request went out
    /// is replaced once, as hyper's pooled client does; a request that was written is never
    /// sent twice.
    pub(super) async fn send(
        self: Arc<Self>,
        connector: &HttpConnector,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<DrivenBody>, HttpError> {
        let (mut parts, body) = request.into_parts();
        let uri = std::mem::take(&mut parts.uri);
        let authority = uri.authority().cloned().ok_or_else(|| HttpError {
            message: format!("no host in {uri}"),
            timeout: false,
        })?;
        if !parts.headers.contains_key(HOST) {
            parts.headers.insert(HOST, host_header(&authority)?);
        }
        // Origin form: the path and query only, as HTTP/1 sends it to a server (not a proxy).
        parts.uri = match uri.path_and_query() {
            Some(path) if path.as_str() != "/" => {
                let mut origin = http::uri::Parts::default();
                origin.path_and_query = Some(PathAndQuery::clone(path));
                Uri::from_parts(origin).unwrap_or_default()
            }
            _ => Uri::default(),
        };
        let mut request = Request::from_parts(parts, body);
        let mut try_idle = true;
        loop {
            let mut conn = match try_idle.then(|| self.check_out(&authority)).flatten() {
                Some(conn) => conn,
                None => connect(connector, &uri, authority.clone()).await?,
            };
            match call(&mut conn, request).await {
                Ok(response) => {
                    let (head, body) = response.into_parts();
                    let body = DrivenBody {
                        body,
                        conn: Some(conn),
                        home: self,
                    };
                    return Ok(Response::from_parts(head, body));
                }
                Err(Failed::NotSent(back)) if conn.reused => {
                    request = *back;
                    try_idle = false;
                }
                Err(Failed::NotSent(_)) => {
                    return Err(HttpError {
                        message: "sending the request failed: the connection closed".to_owned(),
                        timeout: false,
                    });
                }
                Err(Failed::Error(e)) => return Err(e),
            }
        }
    }
}

/// The `Host` header of a destination: its host, and its port unless it is 80.
fn host_header(authority: &Authority) -> Result<HeaderValue, HttpError> {
    let value = match authority.port_u16() {
        Some(port) if port != 80 => HeaderValue::try_from(format!("{}:{port}", authority.host())),
        _ => HeaderValue::try_from(authority.host()),
    };
    value.map_err(|e| HttpError {
        message: format!("invalid host {authority}: {e}"),
        timeout: false,
    })
}

async fn connect(
    connector: &HttpConnector,
    uri: &Uri,
    authority: Authority,
) -> Result<Box<Conn>, HttpError> {
    let mut connector = connector.clone();
    let io = tower_service::Service::call(&mut connector, uri.clone())
        .await
        .map_err(|e| HttpError::from_error("connecting failed", &e))?;
    let (sender, connection) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| HttpError::from_error("connecting failed", &e))?;
    // Boxed: hyper's connection state is most of a kilobyte, moved in and out of the list.
    Ok(Box::new(Conn {
        authority,
        sender,
        connection,
        finished: false,
        reused: false,
        idle_since: Instant::now(),
    }))
}

enum Failed {
    /// The connection closed before the request went out; here it is back.
    NotSent(Box<Request<Full<Bytes>>>),
    Error(HttpError),
}

/// One request on `conn`, driving the connection until the response head is in.
async fn call(
    conn: &mut Conn,
    request: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, Failed> {
    let mut response = std::pin::pin!(conn.sender.try_send_request(request));
    poll_fn(|cx| {
        conn.drive(cx);
        match response.as_mut().poll(cx) {
            Poll::Ready(Ok(response)) => Poll::Ready(Ok(response)),
            Poll::Ready(Err(mut e)) => Poll::Ready(Err(match e.take_message() {
                Some(request) => Failed::NotSent(Box::new(request)),
                None => Failed::Error(HttpError::from_error(
                    "sending the request failed",
                    &e.into_error(),
                )),
            })),
            // hyper answers every request before its connection finishes; this is a guard.
            Poll::Pending if conn.finished => Poll::Ready(Err(Failed::Error(HttpError {
                message: "sending the request failed: the connection closed".to_owned(),
                timeout: false,
            }))),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// A response body that drives its connection while it is read, and hands the connection back
/// to its lane when the body has ended. A body dropped before its end (a stream decoder stops
/// at `[DONE]`, before the final chunk is read) hands it back too if the rest has already
/// arrived; else the connection is closed, as what is left unread cannot be skipped on HTTP/1.
pub(super) struct DrivenBody {
    body: Incoming,
    conn: Option<Box<Conn>>,
    home: Arc<LaneConns>,
}

impl Body for DrivenBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(conn) = this.conn.as_mut() {
            conn.drive(cx);
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = frame
            && let Some(conn) = this.conn.take()
        {
            this.home.check_in(conn);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// At most this many pieces are read off a dropped body to reach its end.
const DRAIN_PIECES: usize = 16;

impl Drop for DrivenBody {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Only what has already arrived: nothing waits here.
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..DRAIN_PIECES {
            conn.drive(&mut cx);
            match Pin::new(&mut self.body).poll_frame(&mut cx) {
                Poll::Ready(None) => {
                    self.home.check_in(conn);
                    return;
                }
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(_))) | Poll::Pending => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use futures_util::StreamExt;
    use hyper_util::client::proxy::matcher::Matcher;
    use tokio::io::AsyncWriteExt;

    use crate::provider::http::{HttpClient, HttpTimeouts, serve_on_lane};
    use crate::provider::openai::test_support::read_request;

    /// What the test upstream saw: connections accepted, and each request (lower-cased).
    #[derive(Default)]
    struct Seen {
        connections: AtomicUsize,
        requests: Mutex<Vec<String>>,
    }

    /// A keep-alive HTTP/1.1 upstream on `127.0.0.1:0` that answers every request with its
    /// number (`"1"`, `"2"`, … over all connections) and closes a connection shortly after
    /// `per_connection` answers, without saying so (as a server whose keep-alive ran out). With
    /// `slow_body`, each body follows its head 50 ms later.
    async fn upstream(per_connection: usize, slow_body: bool) -> (String, Arc<Seen>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Seen::default());
        let served = Arc::new(AtomicUsize::new(0));
        let state = seen.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                state.connections.fetch_add(1, Ordering::SeqCst);
                let (state, served) = (state.clone(), served.clone());
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    for _ in 0..per_connection {
                        let Some(request) = read_request(&mut socket, &mut buffer).await else {
                            return;
                        };
                        state.requests.lock().unwrap().push(request);
                        let number = served.fetch_add(1, Ordering::SeqCst) + 1;
                        let body = number.to_string();
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        if slow_body {
                            socket.write_all(head.as_bytes()).await.unwrap();
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            // The client may have hung up meanwhile.
                            let _ = socket.write_all(body.as_bytes()).await;
                        } else {
                            socket.write_all((head + &body).as_bytes()).await.unwrap();
                        }
                    }
                    // Later than the answer, so the client has put the connection aside.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                });
            }
        });
        (base, seen)
    }

    fn client(read_timeout: Duration) -> HttpClient {
        let timeouts = HttpTimeouts {
            connect: Duration::from_secs(5),
            read: read_timeout,
        };
        HttpClient::with_proxies(timeouts, Matcher::builder().build()).unwrap()
    }

    async fn call(client: &HttpClient, url: &str) -> String {
        let response = client.post_url(url).json(&"hi").send().await.unwrap();
        assert_eq!(response.status(), 200);
        String::from_utf8(response.bytes().await.unwrap().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn calls_on_a_lane_share_one_connection_in_origin_form_with_a_host() {
        serve_on_lane(0);
        let (base, seen) = upstream(usize::MAX, false).await;
        let client = client(Duration::from_secs(5));
        let url = format!("{base}/v1/chat/completions?x=1");
        for expected in ["1", "2", "3"] {
            assert_eq!(call(&client, &url).await, expected);
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
        let requests = seen.requests.lock().unwrap().clone();
        let host = base.trim_start_matches("http://");
        for request in requests {
            assert!(
                request.starts_with("post /v1/chat/completions?x=1 http/1.1\r\n"),
                "{request}"
            );
            assert!(request.contains(&format!("\r\nhost: {host}")), "{request}");
            assert!(
                request.contains("\r\ncontent-type: application/json"),
                "{request}"
            );
        }
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_used_again() {
        serve_on_lane(0);
        let (base, seen) = upstream(1, false).await;
        let client = client(Duration::from_secs(5));
        for expected in ["1", "2", "3"] {
            assert_eq!(call(&client, &base).await, expected);
            // The upstream's close reaches this side before the next call.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_body_dropped_before_it_arrived_does_not_leave_its_connection_for_the_next_call() {
        serve_on_lane(0);
        let (base, seen) = upstream(usize::MAX, true).await;
        let client = client(Duration::from_secs(5));
        let unread = client.post_url(&base).send().await.unwrap();
        drop(unread);
        assert_eq!(call(&client, &base).await, "2");
        assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_body_dropped_after_its_last_byte_arrived_leaves_its_connection_for_the_next_call() {
        serve_on_lane(0);
        let (base, seen) = upstream(usize::MAX, false).await;
        let client = client(Duration::from_secs(5));
        let mut pieces = client.post_url(&base).send().await.unwrap().bytes_stream();
        // The whole body, but not the end of the stream (as a decoder that stops at `[DONE]`).
        assert_eq!(&pieces.next().await.unwrap().unwrap()[..], b"1");
        drop(pieces);
        assert_eq!(call(&client, &base).await, "2");
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_silent_upstream_times_out_on_a_lane() {
        serve_on_lane(0);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let _hold = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
        });
        let client = client(Duration::from_millis(200));
        let error = match client.post_url(&base).send().await {
            Ok(_) => panic!("a silent upstream answered"),
            Err(e) => e,
        };
        assert!(error.timeout, "{error}");
    }
}
