//! The HTTP edge's threads. Each one runs a single-threaded runtime of its own, accepts from the
//! shared listening socket, and serves every request of a connection it accepted, including the
//! provider call a request makes (it is marked as a lane of the providers' HTTP client, see
//! `chorus_actors::provider::http`). The actors keep running on the main, work-stealing runtime.
//!
//! Why not serve on the main runtime: there, a request woke up to three threads (the worker that
//! read it, an idle worker notified to steal, the worker running the upstream connection), and
//! at a moderate rate each wake-up is a context switch into cold caches. Measured on the 2-core
//! machine for `/v1` through the mock upstream (load-tests/README.md, session 6): at 1,000
//! requests/s, 3.6 context switches and 1.1 CPU migrations per request on the shared runtime
//! against 2.3 and 0.6 here; at saturation 52 against 42 µs of CPU per request (20.9k against
//! 26.6k requests/s). This is the layout of nginx's workers and Envoy's worker threads: a
//! connection belongs to one thread, which owns its upstream connections too.
//!
//! The price: no work stealing between edge threads. A handler that computes for long without
//! awaiting holds up the other connections of its thread, so such work goes to
//! `spawn_blocking` (password hashing, document parsing) or to the actors.
//!
//! Every thread waits on the same socket and whichever is free accepts, so new connections go to
//! the thread with the least to do.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::{mpsc, watch};
use warp::reply::Response;

use crate::http::{DirectResponse, Routes};

/// The client's address, set on each request (read with `warp::ext::optional::<PeerAddr>()`).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// How many edge threads `configured` (0: one per core) means on this machine.
pub fn thread_count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, usize::from)
    }
}

/// The running edge threads (see the module doc).
pub struct EdgeThreads {
    stop_accepting: watch::Sender<bool>,
    release: watch::Sender<bool>,
}

/// Reports edge threads whose serving ended: drained after [`EdgeThreads::stop_accepting`], or
/// failed.
pub struct Serving {
    ended: mpsc::UnboundedReceiver<()>,
    running: usize,
}

impl EdgeThreads {
    /// Starts `threads` threads serving `routes` on `listener`. A client that takes longer than
    /// `header_read_timeout` to send a request's head, or to start its next request on a
    /// keep-alive connection, has its connection closed.
    pub fn start(
        listener: std::net::TcpListener,
        threads: usize,
        header_read_timeout: Option<Duration>,
        routes: Routes,
    ) -> std::io::Result<(EdgeThreads, Serving)> {
        listener.set_nonblocking(true)?;
        let (stop_accepting, stop_rx) = watch::channel(false);
        let (release, release_rx) = watch::channel(false);
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let threads = threads.max(1);
        for lane in 0..threads {
            let listener = listener.try_clone()?;
            let routes = routes.clone();
            let stop = stop_rx.clone();
            let mut release = release_rx.clone();
            let ended = EndedGuard(ended_tx.clone());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            std::thread::Builder::new()
                .name(format!("chorus-edge-{lane}"))
                .spawn(move || {
                    chorus_actors::provider::http::serve_on_lane(lane);
                    runtime.block_on(async move {
                        tokio::spawn(keep_timer_wake_up_near());
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => {
                                serve(listener, routes, header_read_timeout, stop).await
                            }
                            Err(e) => {
                                tracing::error!(error = %e, lane, "edge thread cannot listen")
                            }
                        }
                        drop(ended);
                        // Tasks this thread spawned (streams, WebSocket writers, upstream
                        // connections) live on its runtime: keep it until the server is done.
                        let _ = release.wait_for(|released| *released).await;
                    });
                    runtime.shutdown_timeout(Duration::from_secs(1));
                })?;
        }
        Ok((
            EdgeThreads {
                stop_accepting,
                release,
            },
            Serving {
                ended,
                running: threads,
            },
        ))
    }

    /// Stops accepting connections; open ones finish their requests and close.
    pub fn stop_accepting(&self) {
        self.stop_accepting.send_replace(true);
    }
}

impl Drop for EdgeThreads {
    /// Ends the threads (and whatever their runtimes still run).
    fn drop(&mut self) {
        self.stop_accepting.send_replace(true);
        self.release.send_replace(true);
    }
}

impl Serving {
    /// Waits until some edge thread's serving ends.
    pub async fn one_ended(&mut self) {
        if self.ended.recv().await.is_some() {
            self.running = self.running.saturating_sub(1);
        }
    }

    /// Waits until every edge thread's serving has ended.
    pub async fn all_ended(&mut self) {
        while self.running > 0 {
            if self.ended.recv().await.is_none() {
                self.running = 0;
                return;
            }
            self.running -= 1;
        }
    }
}

/// Reports the end of a thread's serving, also when it panics.
struct EndedGuard(mpsc::UnboundedSender<()>);

impl Drop for EndedGuard {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// Accepts and serves connections until told to stop accepting, then waits for the open ones
/// to finish (idle keep-alive connections are closed, requests in flight complete).
async fn serve(
    listener: tokio::net::TcpListener,
    routes: Routes,
    header_read_timeout: Option<Duration>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let filtered = warp::service(routes.filter());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors, most likely: wait for some to close rather than spin.
                tracing::error!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Responses and stream frames are written whole; don't hold them back for ACKs.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let service = TowerToHyperService::new(EdgeService {
            routes: routes.clone(),
            filtered: filtered.clone(),
            peer,
        });
        let watcher = graceful.watcher();
        let builder = builder.clone();
        tokio::spawn(async move {
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Keeps a timer due within the second, forever.
///
/// Why: tokio's timer wakes its runtime's driver (an eventfd write, then an extra `epoll_wait`)
/// whenever a new timer is due before the driver's next planned wake-up. A request's timers
/// (the provider call's read timeout, its deadline) are minutes away, so on a thread with no
/// nearer timer every request paid that: measured with `perf stat` at 1,000 `/v1` requests/s,
/// about one eventfd write per request. With a timer always due within the second, a request's
/// timers are never the nearest and are filed silently; the price is one wake-up per second.
async fn keep_timer_wake_up_near() {
    let mut tick = tokio::time::interval(Duration::from_millis(900));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// A connection's service: the direct route, or else warp's filters (`filtered`), which are
/// told the client's address as a request extension.
#[derive(Clone)]
struct EdgeService<S> {
    routes: Routes,
    filtered: S,
    peer: SocketAddr,
}

/// The answer of the direct route as the service's.
type Direct =
    futures_util::future::Map<DirectResponse, fn(Response) -> Result<Response, Infallible>>;

impl<S> tower_service::Service<http::Request<hyper::body::Incoming>> for EdgeService<S>
where
    S: tower_service::Service<
            http::Request<hyper::body::Incoming>,
            Response = Response,
            Error = Infallible,
        >,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Direct, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.filtered.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        use futures_util::FutureExt;
        match self.routes.direct(request, self.peer) {
            Ok(answer) => {
                Either::Left(answer.map(Ok as fn(Response) -> Result<Response, Infallible>))
            }
            Err(mut request) => {
                request.extensions_mut().insert(PeerAddr(self.peer));
                Either::Right(self.filtered.call(request))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use warp::Filter;

    use super::*;

    /// One request on a new connection, `Connection: close`; the whole answer.
    fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn edge_threads_serve_tell_the_peer_and_drain_in_flight_requests() {
        // `/who` answers the serving thread and the client's address; `/slow` takes 300 ms.
        let routes = warp::path!("who")
            .and(warp::ext::optional::<PeerAddr>())
            .map(|peer: Option<PeerAddr>| {
                let thread = std::thread::current().name().unwrap_or("?").to_owned();
                format!(
                    "{thread} {}",
                    peer.map(|PeerAddr(a)| a.to_string()).unwrap_or_default()
                )
            })
            .or(warp::path!("slow").then(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }))
            .map(warp::reply::Reply::into_response)
            .boxed();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (edge, mut serving) =
            EdgeThreads::start(listener, 2, None, Routes::filter_only(routes)).unwrap();

        let answer = tokio::task::spawn_blocking(move || get(addr, "/who"))
            .await
            .unwrap()
            .unwrap();
        let body = answer.rsplit("\r\n").next().unwrap();
        let (thread, peer) = body.split_once(' ').unwrap();
        assert!(thread.starts_with("chorus-edge-"), "served by {thread}");
        assert_eq!(peer.parse::<SocketAddr>().unwrap().ip(), addr.ip());

        // A request in flight when accepting stops still gets its answer; new connections
        // are refused, and serving ends once it is answered.
        let slow = tokio::task::spawn_blocking(move || get(addr, "/slow"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        edge.stop_accepting();
        tokio::time::timeout(Duration::from_secs(5), serving.all_ended())
            .await
            .expect("edge threads did not drain");
        assert!(slow.await.unwrap().unwrap().ends_with("done"));
        assert!(
            get(addr, "/who").is_err(),
            "a connection was accepted after stopping"
        );
    }
}
