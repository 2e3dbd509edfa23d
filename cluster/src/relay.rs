//! Cross-node streaming of a thread's events, with flow control.
//!
//! ```text
//!  edge node A                                   home node B
//!  InboundStream ◄── Events{id, batch} ─────────  Pump (reader on the thread's log)
//!       │        ─── Credit{id, n} ───────────►  (sends only while it holds credits)
//!       └ drop   ─── Close{id} ───────────────►  stops
//! ```
//!
//! The edge grants `window` events up front and more as its client consumes them, so at most
//! `window` events per stream are in flight or queued on A however slow the client is; the rest
//! wait in B's bounded log, where a reconnecting client would find them anyway. Events keep the
//! sequence numbers of B's log, so `Last-Event-ID` works against any node. Casts between two
//! nodes travel over one connection and one relay actor each, so order is kept.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chorus_actors::session::events::{EventReader, EventRecord};
use futures_util::Stream;
use ractor::ActorRef;
use tokio::sync::{Semaphore, mpsc};

use crate::codec::{self, Cast, StreamTarget, WireEvent};
use crate::peer::PeerMessage;

/// Finds a peer's relay now. A node pair may briefly have two sessions (both connected at once;
/// one is then closed), so a reference taken earlier can go stale: senders look it up again
/// rather than give up.
pub type PeerResolver = Arc<dyn Fn() -> Option<ActorRef<PeerMessage>> + Send + Sync>;

/// How long a sender keeps looking for a peer's relay before giving up on it.
const RESOLVE_FOR: std::time::Duration = std::time::Duration::from_secs(3);

/// Sends `cast` to the peer `resolve` finds, looking again while it fails (up to
/// [`RESOLVE_FOR`]); `false` when the peer stayed unreachable.
async fn send_resolving(resolve: &PeerResolver, cast: &Cast) -> bool {
    let deadline = tokio::time::Instant::now() + RESOLVE_FOR;
    loop {
        if let Some(peer) = resolve()
            && send(&peer, cast)
        {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Sends from synchronous code (a stream's poll, a drop): at once when the peer is there, else
/// in the background.
pub(crate) fn send_soon(resolve: &PeerResolver, cast: Cast) {
    if let Some(peer) = resolve()
        && send(&peer, &cast)
    {
        return;
    }
    let resolve = resolve.clone();
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move { send_resolving(&resolve, &cast).await });
    }
}

/// Events granted per stream before the edge must grant more.
pub const DEFAULT_WINDOW: u32 = 512;
/// Most events per `Events` cast.
const BATCH_MAX: usize = 128;

/// The event names of the contract (API.md, Streaming); a name outside it is not relayed.
const EVENT_NAMES: [&str; 6] = [
    "message_start",
    "status",
    "delta",
    "message_complete",
    "error",
    "done",
];

fn static_name(name: &str) -> Option<&'static str> {
    EVENT_NAMES.iter().find(|n| **n == name).copied()
}

enum Inbound {
    Events(Vec<WireEvent>),
    End,
}

struct Pump {
    credits: Arc<Semaphore>,
    task: tokio::task::AbortHandle,
}

/// This node's side of every relayed stream: those it receives (as an edge) and those it sends
/// (as a home).
pub struct Relay {
    local: String,
    next_id: AtomicU64,
    /// Streams received, by id: the home node sending them, and where their events go.
    inbound: Mutex<HashMap<u64, (String, mpsc::Sender<Inbound>)>>,
    pumps: Mutex<HashMap<(String, u64), Pump>>,
}

impl Relay {
    pub fn new(local: String) -> Relay {
        Relay {
            local,
            next_id: AtomicU64::new(1),
            inbound: Mutex::new(HashMap::new()),
            pumps: Mutex::new(HashMap::new()),
        }
    }

    // ---- edge side ----

    /// Registers a stream this node will receive; send the target with the request that opens it.
    pub fn register(self: &Arc<Self>, home: &str, window: u32) -> PendingStream {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let window = window.max(2);
        // Each cast carries at least one event, so `window` slots always suffice.
        let (tx, rx) = mpsc::channel(window as usize);
        if let Ok(mut inbound) = self.inbound.lock() {
            inbound.insert(id, (home.to_owned(), tx));
        }
        PendingStream {
            relay: self.clone(),
            target: StreamTarget {
                origin: self.local.clone(),
                id,
                window,
            },
            rx: Some(rx),
        }
    }

    fn unregister(&self, id: u64) {
        if let Ok(mut inbound) = self.inbound.lock() {
            inbound.remove(&id);
        }
    }

    /// Streams this node receives from a home that is gone end (their clients reconnect).
    pub fn end_streams_from(&self, home: &str) {
        let ids: Vec<u64> = self
            .inbound
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|(_, (h, _))| h == home)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        for id in ids {
            self.deliver(id, Inbound::End);
        }
    }

    fn deliver(&self, id: u64, item: Inbound) {
        let sender = self
            .inbound
            .lock()
            .ok()
            .and_then(|m| m.get(&id).map(|(_, tx)| tx.clone()));
        let Some(sender) = sender else {
            return; // closed meanwhile; the home hears of it from our Close
        };
        if sender.try_send(item).is_err() {
            // Only a home ignoring its credits can overfill the queue: end that stream.
            tracing::warn!(stream = id, "relay stream overran its window; ending it");
            self.unregister(id);
        }
    }

    // ---- home side ----

    /// Starts sending `reader`'s events to `target` through `peer` (the edge node's relay).
    pub fn start_pump(&self, reader: EventReader, target: StreamTarget, peer: PeerResolver) {
        let credits = Arc::new(Semaphore::new(target.window as usize));
        let key = (target.origin.clone(), target.id);
        let task = tokio::spawn(pump(reader, target.id, credits.clone(), peer)).abort_handle();
        if let Ok(mut pumps) = self.pumps.lock()
            && let Some(old) = pumps.insert(key, Pump { credits, task })
        {
            old.task.abort();
        }
    }

    /// Stops every pump feeding `origin` (it closed, or it is gone).
    pub fn stop_pumps_to(&self, origin: &str) {
        if let Ok(mut pumps) = self.pumps.lock() {
            pumps.retain(|(o, _), pump| {
                if o == origin {
                    pump.task.abort();
                    false
                } else {
                    true
                }
            });
        }
    }

    /// Streams this node is sending (for the admin view and tests).
    pub fn pumps(&self) -> usize {
        self.pumps
            .lock()
            .map(|p| p.values().filter(|pump| !pump.task.is_finished()).count())
            .unwrap_or(0)
    }

    /// Streams this node sends whose window is used up: the edge's client has not consumed what
    /// was sent, so the pump waits for credit (flow control at work; the home's log keeps the
    /// rest).
    pub fn pumps_waiting_for_credit(&self) -> usize {
        self.pumps
            .lock()
            .map(|p| {
                p.values()
                    .filter(|pump| {
                        !pump.task.is_finished() && pump.credits.available_permits() == 0
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// Streams this node is receiving.
    pub fn inbound(&self) -> usize {
        self.inbound.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Handles a relay cast. Runs on the relay actor, so casts are handled in arrival order.
    pub fn on_cast(&self, cast: Cast) {
        match cast {
            Cast::Events { id, events } => self.deliver(id, Inbound::Events(events)),
            Cast::End { id } => self.deliver(id, Inbound::End),
            Cast::Credit { origin, id, n } => {
                let pumps = self.pumps.lock();
                if let Ok(pumps) = pumps
                    && let Some(pump) = pumps.get(&(origin, id))
                {
                    pump.credits.add_permits(n as usize);
                }
            }
            Cast::Close { origin, id } => {
                if let Ok(mut pumps) = self.pumps.lock()
                    && let Some(pump) = pumps.remove(&(origin, id))
                {
                    pump.task.abort();
                }
            }
            Cast::Settle { .. } | Cast::Leaving { .. } | Cast::Limits { .. } => {}
        }
    }
}

async fn pump(mut reader: EventReader, id: u64, credits: Arc<Semaphore>, peer: PeerResolver) {
    loop {
        // Wait for one credit, then take what else is granted (up to a batch).
        let Ok(first) = credits.acquire().await else {
            return;
        };
        first.forget();
        let extra = credits.available_permits().min(BATCH_MAX - 1);
        let Some(batch) = reader.next_batch(1 + extra).await else {
            send_resolving(&peer, &Cast::End { id }).await;
            return;
        };
        if batch.len() > 1
            && let Ok(taken) = credits.try_acquire_many(batch.len() as u32 - 1)
        {
            taken.forget();
        }
        let events = batch
            .iter()
            .map(|e| WireEvent {
                seq: e.seq,
                turn_id: e.turn_id,
                name: e.name.to_owned(),
                data: e.data.clone(),
            })
            .collect();
        if !send_resolving(&peer, &Cast::Events { id, events }).await {
            return;
        }
    }
}

/// Sends a cast to a peer's relay; `false` when the peer is gone.
pub(crate) fn send(peer: &ActorRef<PeerMessage>, cast: &Cast) -> bool {
    match codec::encode(cast) {
        Ok(bytes) => peer.cast(PeerMessage::Cast(bytes)).is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "encoding a relay cast");
            false
        }
    }
}

/// A registered stream whose opening request has not been answered yet.
pub struct PendingStream {
    relay: Arc<Relay>,
    target: StreamTarget,
    rx: Option<mpsc::Receiver<Inbound>>,
}

impl PendingStream {
    pub fn target(&self) -> StreamTarget {
        self.target.clone()
    }

    /// The stream, once the home accepted it; `home_relay` receives credits and the close.
    pub fn open(mut self, home_relay: PeerResolver) -> InboundStream {
        let rx = self.rx.take();
        InboundStream {
            guard: StreamGuard {
                relay: self.relay.clone(),
                target: self.target.clone(),
                home_relay,
            },
            rx,
            pending: std::collections::VecDeque::new(),
            consumed: 0,
            ended: false,
        }
    }
}

impl Drop for PendingStream {
    fn drop(&mut self) {
        if self.rx.is_some() {
            self.relay.unregister(self.target.id);
        }
    }
}

struct StreamGuard {
    relay: Arc<Relay>,
    target: StreamTarget,
    home_relay: PeerResolver,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.relay.unregister(self.target.id);
        send_soon(
            &self.home_relay,
            Cast::Close {
                origin: self.target.origin.clone(),
                id: self.target.id,
            },
        );
    }
}

/// The events of a remote thread log, in order, as an edge reads them.
pub struct InboundStream {
    guard: StreamGuard,
    rx: Option<mpsc::Receiver<Inbound>>,
    pending: std::collections::VecDeque<Arc<EventRecord>>,
    consumed: u32,
    ended: bool,
}

impl InboundStream {
    fn grant(&mut self) {
        self.consumed += 1;
        if self.consumed >= self.guard.target.window / 2 {
            let n = std::mem::take(&mut self.consumed);
            send_soon(
                &self.guard.home_relay,
                Cast::Credit {
                    origin: self.guard.target.origin.clone(),
                    id: self.guard.target.id,
                    n,
                },
            );
        }
    }
}

impl Stream for InboundStream {
    type Item = Arc<EventRecord>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.grant();
                return Poll::Ready(Some(event));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            let Some(rx) = self.rx.as_mut() else {
                return Poll::Ready(None);
            };
            match rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) | Poll::Ready(Some(Inbound::End)) => {
                    self.ended = true;
                }
                Poll::Ready(Some(Inbound::Events(events))) => {
                    let mut dropped = 0;
                    for e in events {
                        match static_name(&e.name) {
                            Some(name) => self.pending.push_back(Arc::new(EventRecord {
                                seq: e.seq,
                                turn_id: e.turn_id,
                                name,
                                data: e.data,
                            })),
                            None => {
                                tracing::warn!(name = %e.name, "relayed event with an unknown name dropped");
                                dropped += 1;
                            }
                        }
                    }
                    // A dropped event used a credit too: give it back.
                    for _ in 0..dropped {
                        self.grant();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {

    use std::time::Duration;

    use chorus_actors::session::events::ThreadEvents;
    use futures_util::StreamExt;
    use ractor::Actor;
    use uuid::Uuid;

    use super::*;
    use crate::peer::{Inbox, PeerEndpoint};

    /// A node's relay endpoint, as the router/relay actors of a real node feed it.
    struct RelayInbox(Arc<Relay>);

    impl Inbox for RelayInbox {
        fn call(
            self: Arc<Self>,
            _bytes: Vec<u8>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>> + Send>> {
            Box::pin(async { Vec::new() })
        }

        fn cast(&self, bytes: Vec<u8>) {
            self.0.on_cast(codec::decode::<Cast>(&bytes).unwrap());
        }
    }

    async fn endpoint(relay: &Arc<Relay>, group: &'static str) -> PeerResolver {
        let inbox: Arc<dyn Inbox> = Arc::new(RelayInbox(relay.clone()));
        let (endpoint, _) = Actor::spawn(None, PeerEndpoint, (inbox, group))
            .await
            .unwrap();
        Arc::new(move || Some(endpoint.clone()))
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_reader_that_stops_holds_its_home_at_one_window_and_loses_nothing() {
        let (home, edge) = (
            Arc::new(Relay::new("home".into())),
            Arc::new(Relay::new("edge".into())),
        );
        let to_home = endpoint(&home, "test.relay.home").await;
        let to_edge = endpoint(&edge, "test.relay.edge").await;
        let log = ThreadEvents::new(Uuid::now_v7());
        let turn = Uuid::now_v7();
        for i in 0..1_000 {
            log.append(turn, "delta", &serde_json::json!({ "i": i }));
        }

        let window = 16;
        let pending = edge.register("home", window);
        home.start_pump(log.reader(0), pending.target(), to_edge);
        let mut events = pending.open(to_home);
        // Nothing read yet: the home sends one window and waits for credit.
        until("the pump never waited for credit", || {
            home.pumps_waiting_for_credit() == 1
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(home.pumps_waiting_for_credit(), 1);

        // Reading releases it, window by window: every event, in order, exactly once.
        for i in 0..1_000 {
            let event = events.next().await.unwrap();
            assert_eq!(event.data, format!("{{\"i\":{i}}}"));
        }
        assert_eq!(edge.inbound(), 1);
        // Dropping the stream closes it at the home.
        drop(events);
        until("the pump did not stop", || home.pumps() == 0).await;
        assert_eq!(edge.inbound(), 0);
    }
}
