//! Routing to the home session: the edge's one handle for user-scoped operations.
//!
//! [`Homes`] has the methods of `Sessions`. Each asks placement for the user's home: this node
//! → the local session, directly; another node → a typed call to that node's router, with a
//! timeout. The home side of those calls is [`Dispatcher`], which runs the same operations on
//! its own sessions, so both paths share one [`execute`].

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chorus_actors::session::events::EventRecord;
use chorus_actors::session::retrieval::SearchResults;
use chorus_actors::session::turn::FirstOutcome;
use chorus_actors::session::{
    NewThread, ProfilePatch, Reservation, SearchQuery, SendMessage, SessionError, Sessions,
    ThreadPatch, TierRoleChange,
};
use chorus_actors::store::{ApiKey, Document, Message, ProviderKey, Store, Summary, Thread, User};
use futures_util::{Stream, StreamExt};
use ractor::ActorRef;
use uuid::Uuid;

use crate::codec::{
    self, Cast, FromValue, LiveTurnsWire, Reply, Request, SessionOp, StreamTarget, TurnStartedWire,
    Value, WireError,
};
use crate::membership::{MembershipMessage, PeerRefs, SharedView};
use crate::peer::{Inbox, PeerMessage};
use crate::relay::{self, DEFAULT_WINDOW, Relay};

/// A thread's events in order, wherever its log lives.
pub type EventStream = Pin<Box<dyn Stream<Item = Arc<EventRecord>> + Send>>;

/// A turn that has started on the user's home.
pub struct HomeTurn {
    pub turn_id: Uuid,
    pub user_message: Message,
    pub assistant_messages: Vec<Message>,
    /// The user's requests-per-minute bucket after this request (for `X-RateLimit-*`).
    pub rate_limit: chorus_actors::quota::Admission,
    /// How the turn started; `None` when nothing happened within the first-token wait.
    pub first_outcome: Option<FirstOutcome>,
    /// The thread's events from this turn's first one on (other turns' events may interleave;
    /// see [`turn_events`]).
    pub events: EventStream,
}

/// A subscription to a thread's events.
pub struct Subscription {
    /// The cursor the stream starts after (the client's, or the live start).
    pub after: u64,
    pub events: EventStream,
}

/// The events of one turn from `events`, ending right after its `done`.
pub fn turn_events(events: EventStream, turn_id: Uuid) -> EventStream {
    Box::pin(chorus_actors::session::events::turn_only(events, turn_id))
}

enum Route {
    Local,
    Remote { node: String, refs: PeerRefs },
}

/// The edge's handle on every user's home session. Cheap to clone.
#[derive(Clone)]
pub struct Homes {
    sessions: Sessions,
    view: Option<SharedView>,
    /// Where a thread's turn runs, when it is not the user's home (clustered only).
    store: Option<Arc<dyn Store>>,
    /// Cleared while the node is joining: it is then no user's home (see `Cluster::is_joining`).
    joined: Option<Arc<std::sync::atomic::AtomicBool>>,
    relay: Arc<Relay>,
    call_timeout: Duration,
    /// How long a home waits for a turn's first outcome before answering.
    first_wait: Duration,
}

impl Homes {
    /// A cluster of one: every home is local.
    pub fn local(sessions: Sessions, first_wait: Duration) -> Homes {
        Homes {
            sessions,
            view: None,
            store: None,
            joined: None,
            relay: Arc::new(Relay::new(String::new())),
            call_timeout: Duration::from_secs(10),
            first_wait,
        }
    }

    pub(crate) fn clustered(
        sessions: Sessions,
        store: Arc<dyn Store>,
        joined: Arc<std::sync::atomic::AtomicBool>,
        view: SharedView,
        relay: Arc<Relay>,
        call_timeout: Duration,
        first_wait: Duration,
    ) -> Homes {
        Homes {
            sessions,
            view: Some(view),
            store: Some(store),
            joined: Some(joined),
            relay,
            call_timeout,
            first_wait,
        }
    }

    /// This node's own sessions (for node-local work such as hand-off).
    pub fn local_sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// `node`'s router in the current view.
    fn router_of(&self, node: &str) -> Option<ActorRef<PeerMessage>> {
        router_in(self.view.as_ref()?, node)
    }

    /// Finds `node`'s relay in the current view each time it is asked.
    fn relay_of(&self, node: &str) -> relay::PeerResolver {
        let (view, node) = (self.view.clone(), node.to_owned());
        Arc::new(move || relay_in(view.as_ref()?, &node))
    }

    fn route(&self, user: Uuid) -> Result<Route, SessionError> {
        let Some(shared) = &self.view else {
            return Ok(Route::Local);
        };
        // A node that has not met its peers yet would take every user for its own, with fresh
        // limits and no running turns: it serves no one until it has joined.
        if self
            .joined
            .as_ref()
            .is_some_and(|joined| !joined.load(std::sync::atomic::Ordering::Acquire))
        {
            return Err(SessionError::Unavailable(
                "this node is joining the cluster".into(),
            ));
        }
        let view = shared
            .read()
            .map(|v| v.clone())
            .map_err(|_| SessionError::Unavailable("cluster view poisoned".into()))?;
        match view.ring.home(user) {
            // An empty ring: this node is the last one, and leaving; it still serves.
            None => Ok(Route::Local),
            Some(home) if home == view.local.as_str() => Ok(Route::Local),
            Some(home) => match view.peers.get(home) {
                Some(refs) => Ok(Route::Remote {
                    node: home.to_owned(),
                    refs: refs.clone(),
                }),
                None => Err(SessionError::Unavailable(format!(
                    "home node {home} is not reachable"
                ))),
            },
        }
    }

    async fn call(
        &self,
        node: &str,
        router: &ActorRef<PeerMessage>,
        request: &Request,
    ) -> Result<Reply, SessionError> {
        // Starting a turn may wait for its first outcome on the home: allow for that.
        let timeout = match request {
            Request::StartTurn {
                wait_first: true, ..
            } => self
                .call_timeout
                .max(self.first_wait + Duration::from_secs(2)),
            _ => self.call_timeout,
        };
        let bytes = codec::encode(request).map_err(|e| SessionError::Unavailable(e.to_string()))?;
        let counter = &chorus_actors::metrics::metrics().cluster_remote_calls_total;
        // A send that fails never left this node, so it may be tried again: a node pair can
        // briefly hold two sessions, and a reference taken from the closing one goes stale.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut router = router.clone();
        let answer = loop {
            let bytes = bytes.clone();
            match router
                .call(|port| PeerMessage::Call(bytes, port), Some(timeout))
                .await
            {
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if let Some(fresh) = self.router_of(node) {
                        router = fresh;
                    }
                }
                delivered => break delivered,
            }
        };
        match answer {
            Ok(ractor::rpc::CallResult::Success(answer)) => {
                counter.inc(["ok"]);
                match codec::decode::<Reply>(&answer) {
                    Ok(Reply::Refused(why)) => Err(SessionError::Unavailable(format!(
                        "home node {node} refused the request: {why}"
                    ))),
                    Ok(reply) => Ok(reply),
                    Err(e) => Err(SessionError::Unavailable(format!("home node {node}: {e}"))),
                }
            }
            Ok(ractor::rpc::CallResult::Timeout) => {
                counter.inc(["timeout"]);
                Err(SessionError::Unavailable(format!(
                    "home node {node} did not answer in time"
                )))
            }
            Ok(ractor::rpc::CallResult::SenderError) | Err(_) => {
                // ractor_cluster reports a remote timeout as a closed channel too.
                counter.inc(["unreachable"]);
                Err(SessionError::Unavailable(format!(
                    "home node {node} is not reachable"
                )))
            }
        }
    }

    async fn op<T: FromValue>(&self, user: Uuid, op: SessionOp) -> Result<T, SessionError> {
        self.op_via(self.route(user)?, user, op).await
    }

    async fn op_via<T: FromValue>(
        &self,
        route: Route,
        user: Uuid,
        op: SessionOp,
    ) -> Result<T, SessionError> {
        match route {
            Route::Local => T::from_value(execute(&self.sessions, user, op).await?),
            Route::Remote { node, refs } => {
                match self
                    .call(&node, &refs.router, &Request::Session { user, op })
                    .await?
                {
                    Reply::Session(answer) => T::from_value(answer.map_err(SessionError::from)?),
                    _ => Err(unexpected(&node)),
                }
            }
        }
    }

    pub async fn search(
        &self,
        user: Uuid,
        query: SearchQuery,
    ) -> Result<SearchResults, SessionError> {
        self.op(user, SessionOp::Search(query)).await
    }

    pub async fn flush_usage(&self, user: Uuid) -> Result<(), SessionError> {
        self.op(user, SessionOp::FlushUsage).await
    }

    pub async fn create_thread(&self, user: Uuid, new: NewThread) -> Result<Thread, SessionError> {
        self.op(user, SessionOp::CreateThread(new)).await
    }

    pub async fn update_thread(
        &self,
        user: Uuid,
        thread: Uuid,
        patch: ThreadPatch,
    ) -> Result<Thread, SessionError> {
        self.op(user, SessionOp::UpdateThread(thread, patch)).await
    }

    pub async fn delete_thread(&self, user: Uuid, thread: Uuid) -> Result<(), SessionError> {
        self.op(user, SessionOp::DeleteThread(thread)).await
    }

    pub async fn update_profile(
        &self,
        user: Uuid,
        patch: ProfilePatch,
    ) -> Result<User, SessionError> {
        self.op(user, SessionOp::UpdateProfile(patch)).await
    }

    pub async fn set_tier_role(
        &self,
        user: Uuid,
        change: TierRoleChange,
    ) -> Result<User, SessionError> {
        self.op(user, SessionOp::SetTierRole(change)).await
    }

    pub async fn create_api_key(
        &self,
        user: Uuid,
        key: ApiKey,
        max_keys: usize,
    ) -> Result<ApiKey, SessionError> {
        self.op(user, SessionOp::CreateApiKey(key, max_keys)).await
    }

    pub async fn delete_api_key(&self, user: Uuid, key: Uuid) -> Result<(), SessionError> {
        self.op(user, SessionOp::DeleteApiKey(key)).await
    }

    pub async fn put_provider_key(&self, key: ProviderKey) -> Result<(), SessionError> {
        self.op(key.user_id, SessionOp::PutProviderKey(key)).await
    }

    pub async fn delete_provider_key(
        &self,
        user: Uuid,
        provider: &str,
    ) -> Result<(), SessionError> {
        self.op(user, SessionOp::DeleteProviderKey(provider.to_owned()))
            .await
    }

    pub async fn cancel_turn(
        &self,
        user: Uuid,
        thread: Uuid,
        turn: Uuid,
    ) -> Result<(), SessionError> {
        let route = self.route(user)?;
        let home = self.node_of(&route);
        match self
            .op_via(route, user, SessionOp::CancelTurn(thread, turn))
            .await
        {
            // Not at home: the turn may be finishing on the user's previous home.
            Err(SessionError::NotFound) => {
                let Some(node) = self.turn_node_elsewhere(user, thread, &home).await else {
                    return Err(SessionError::NotFound);
                };
                if node == self.local_name() {
                    return self.sessions.cancel_live_turn(user, thread, turn).await;
                }
                let router = self.router_of(&node).ok_or(SessionError::NotFound)?;
                match self
                    .call(
                        &node,
                        &router,
                        &Request::CancelLiveTurn { user, thread, turn },
                    )
                    .await?
                {
                    Reply::Session(answer) => <()>::from_value(answer.map_err(SessionError::from)?),
                    _ => Err(unexpected(&node)),
                }
            }
            other => other,
        }
    }

    pub async fn summarize(
        &self,
        user: Uuid,
        thread: Uuid,
        model: Option<String>,
    ) -> Result<Summary, SessionError> {
        self.op(user, SessionOp::Summarize(thread, model)).await
    }

    pub async fn upload_limit(&self, user: Uuid) -> Result<u64, SessionError> {
        self.op(user, SessionOp::UploadLimit).await
    }

    pub async fn create_document(&self, document: Document) -> Result<Document, SessionError> {
        self.op(document.user_id, SessionOp::CreateDocument(document))
            .await
    }

    pub async fn delete_document(&self, user: Uuid, document: Uuid) -> Result<(), SessionError> {
        self.op(user, SessionOp::DeleteDocument(document)).await
    }

    /// See `Sessions::admit`; settle with [`Homes::settle`].
    pub async fn admit(
        &self,
        user: Uuid,
        model_id: &str,
        estimated_tokens: u64,
    ) -> Result<Reservation, SessionError> {
        match self.route(user)? {
            // The hot path of `/v1`: no enum round trip when the home is here.
            Route::Local => self.sessions.admit(user, model_id, estimated_tokens).await,
            Route::Remote { node, refs } => {
                let op = SessionOp::Admit(model_id.to_owned(), estimated_tokens);
                match self
                    .call(&node, &refs.router, &Request::Session { user, op })
                    .await?
                {
                    Reply::Session(answer) => {
                        Reservation::from_value(answer.map_err(SessionError::from)?)
                    }
                    _ => Err(unexpected(&node)),
                }
            }
        }
    }

    /// Hands the user's per-minute buckets from this node to its home, after the home moved
    /// away from here: the new home adds them to its own, so a move does not refill them.
    pub fn hand_over_limits(&self, user: Uuid) {
        let Ok(Route::Remote { node, refs }) = self.route(user) else {
            return;
        };
        let used = self.sessions.take_used_limits(user);
        if used.is_empty() {
            return;
        }
        self.cast_to_router(node, &refs.router, Cast::Limits { user, used });
    }

    /// Casts to a home's router; a stale reference (see `call`) is looked up again, in the
    /// background.
    fn cast_to_router(&self, node: String, router: &ActorRef<PeerMessage>, cast: Cast) {
        if !relay::send(router, &cast) {
            let view = self.view.clone();
            let resolve: relay::PeerResolver = Arc::new(move || router_in(view.as_ref()?, &node));
            relay::send_soon(&resolve, cast);
        }
    }

    /// Settles a reservation at the user's home (a message; nothing to wait for).
    pub fn settle(&self, user: Uuid, reservation: Reservation, used_tokens: u64, cost_usd: f64) {
        match self.route(user) {
            Ok(Route::Remote { node, refs }) => {
                let cast = Cast::Settle {
                    user,
                    reservation,
                    used_tokens,
                    cost_usd,
                };
                self.cast_to_router(node, &refs.router, cast);
            }
            // Settled where it was admitted when the home is here (or unknown right now: the
            // reservation refills on its own at worst).
            _ => settle_locally(&self.sessions, user, reservation, used_tokens, cost_usd),
        }
    }

    /// Stores the user message and starts a turn on the user's home, with its event stream.
    /// With `wait_first`, answers once the turn's first outcome is known (or the first-token
    /// wait passed), so that the edge can still answer with an HTTP error.
    pub async fn start_turn(
        &self,
        user: Uuid,
        thread: Uuid,
        send: SendMessage,
        wait_first: bool,
    ) -> Result<HomeTurn, SessionError> {
        match self.route(user)? {
            Route::Local => {
                let started = self.sessions.start_turn(user, thread, send).await?;
                let events: EventStream =
                    Box::pin(started.log.reader(started.from_seq - 1).into_stream());
                let first_outcome =
                    first_outcome(started.first_outcome, wait_first, self.first_wait).await;
                Ok(HomeTurn {
                    turn_id: started.turn_id,
                    user_message: started.user_message,
                    assistant_messages: started.assistant_messages,
                    rate_limit: started.rate_limit,
                    first_outcome,
                    events,
                })
            }
            Route::Remote { node, refs } => {
                // Register the stream first: events may arrive before the answer.
                let pending = self.relay.register(&node, DEFAULT_WINDOW);
                let request = Request::StartTurn {
                    user,
                    thread,
                    send,
                    stream: pending.target(),
                    wait_first,
                };
                match self.call(&node, &refs.router, &request).await? {
                    Reply::TurnStarted(answer) => {
                        let wire = answer.map_err(SessionError::from)?;
                        Ok(HomeTurn {
                            turn_id: wire.turn_id,
                            user_message: wire.user_message,
                            assistant_messages: wire.assistant_messages,
                            rate_limit: wire.rate_limit,
                            first_outcome: wire.first_outcome,
                            events: Box::pin(pending.open(self.relay_of(&node))),
                        })
                    }
                    _ => Err(unexpected(&node)),
                }
            }
        }
    }

    /// The events of one of the user's threads after `after` (`None`: from the live start — the
    /// first event of a turn still running, else from now on).
    ///
    /// After a hand-off a turn finishes on the node it started on while the user's new home
    /// serves everything else: the subscription then reads that node's log until those turns are
    /// done, and continues at the home after the last event it passed on. Sequence numbers only
    /// grow across logs (they start at the time a log was made), so the cursor carries over.
    pub async fn subscribe(
        &self,
        user: Uuid,
        thread: Uuid,
        after: Option<u64>,
    ) -> Result<Subscription, SessionError> {
        let route = self.route(user)?;
        let home = self.node_of(&route);
        if let Some(node) = self.turn_node_elsewhere(user, thread, &home).await
            && let Some(earlier) = self.open_live_turns(&node, user, thread, after).await
        {
            let cursor = Arc::new(std::sync::atomic::AtomicU64::new(earlier.after));
            let seen = cursor.clone();
            let head = until_done(earlier.events, earlier.turns).inspect(move |event| {
                seen.store(event.seq, std::sync::atomic::Ordering::Relaxed);
            });
            let homes = self.clone();
            let tail = futures_util::stream::once(async move {
                let after = cursor.load(std::sync::atomic::Ordering::Relaxed);
                let rest = match homes.route(user) {
                    Ok(route) => homes.subscribe_via(route, user, thread, Some(after)).await,
                    Err(e) => Err(e),
                };
                match rest {
                    Ok(rest) => rest.events,
                    Err(e) => {
                        // The client sees its stream end and reconnects with its cursor.
                        tracing::warn!(%user, %thread, error = %e, "continuing a thread's events at its home");
                        Box::pin(futures_util::stream::empty()) as EventStream
                    }
                }
            })
            .flatten();
            return Ok(Subscription {
                after: earlier.after,
                events: Box::pin(head.chain(tail)),
            });
        }
        self.subscribe_via(route, user, thread, after).await
    }

    async fn subscribe_via(
        &self,
        route: Route,
        user: Uuid,
        thread: Uuid,
        after: Option<u64>,
    ) -> Result<Subscription, SessionError> {
        match route {
            Route::Local => {
                let log = self.sessions.subscribe(user, thread).await?;
                let after = after.unwrap_or_else(|| log.live_start());
                Ok(Subscription {
                    after,
                    events: Box::pin(log.reader(after).into_stream()),
                })
            }
            Route::Remote { node, refs } => {
                let pending = self.relay.register(&node, DEFAULT_WINDOW);
                let request = Request::OpenStream {
                    user,
                    thread,
                    after,
                    stream: pending.target(),
                };
                match self.call(&node, &refs.router, &request).await? {
                    Reply::StreamOpened(answer) => Ok(Subscription {
                        after: answer.map_err(SessionError::from)?,
                        events: Box::pin(pending.open(self.relay_of(&node))),
                    }),
                    _ => Err(unexpected(&node)),
                }
            }
        }
    }

    fn local_name(&self) -> String {
        self.view
            .as_ref()
            .and_then(|v| v.read().ok().map(|v| v.local.as_str().to_owned()))
            .unwrap_or_default()
    }

    /// The node a route leads to.
    fn node_of(&self, route: &Route) -> String {
        match route {
            Route::Local => self.local_name(),
            Route::Remote { node, .. } => node.clone(),
        }
    }

    /// The member a turn of `thread` still runs on, when that is not the user's home `home`
    /// (the home moved while the turn ran). One store read; clustered nodes only.
    async fn turn_node_elsewhere(&self, user: Uuid, thread: Uuid, home: &str) -> Option<String> {
        let store = self.store.as_ref()?;
        let node = match store.streaming_node(user, thread).await {
            Ok(node) => node?,
            Err(e) => {
                tracing::warn!(%user, %thread, error = %e, "looking up where a turn runs");
                return None;
            }
        };
        // A node that is gone left its turns to the reaper: nothing runs there any more.
        let member = node == self.local_name() || self.router_of(&node).is_some();
        (node != home && member).then_some(node)
    }

    /// The turns of `thread` running on `node` and its events after `after`; `None` when none
    /// run there any more (or it cannot be asked: the home then serves what is stored).
    async fn open_live_turns(
        &self,
        node: &str,
        user: Uuid,
        thread: Uuid,
        after: Option<u64>,
    ) -> Option<LiveTurnsStream> {
        if node == self.local_name() {
            let live = self.sessions.live_turns(user, thread).await?;
            let after = after.unwrap_or_else(|| live.log.live_start());
            return Some(LiveTurnsStream {
                after,
                turns: live.turns,
                events: Box::pin(live.log.reader(after).into_stream()),
            });
        }
        let router = self.router_of(node)?;
        let pending = self.relay.register(node, DEFAULT_WINDOW);
        let request = Request::OpenLiveTurns {
            user,
            thread,
            after,
            stream: pending.target(),
        };
        match self.call(node, &router, &request).await {
            Ok(Reply::LiveTurnsOpened(Some(LiveTurnsWire { after, turns }))) => {
                Some(LiveTurnsStream {
                    after,
                    turns,
                    events: Box::pin(pending.open(self.relay_of(node))),
                })
            }
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(%user, %thread, node, error = %e, "asking a previous home for its turns");
                None
            }
        }
    }
}

/// Turns running on a node that is no longer the user's home, with the thread's events there.
struct LiveTurnsStream {
    after: u64,
    turns: Vec<Uuid>,
    events: EventStream,
}

/// `events` until each of `turns` has logged its `done` (or the log ends).
fn until_done(events: EventStream, turns: Vec<Uuid>) -> impl Stream<Item = Arc<EventRecord>> {
    let open: std::collections::HashSet<Uuid> = turns.into_iter().collect();
    futures_util::stream::unfold((events, open), |(mut events, mut open)| async move {
        if open.is_empty() {
            return None;
        }
        let event = events.next().await?;
        if event.is_done() {
            open.remove(&event.turn_id);
        }
        Some((event, (events, open)))
    })
}

/// One cast to the user's live session; a task only when it has to be started again.
fn settle_locally(
    sessions: &Sessions,
    user: Uuid,
    reservation: Reservation,
    used_tokens: u64,
    cost_usd: f64,
) {
    if let Some(reservation) = sessions.try_settle(user, reservation, used_tokens, cost_usd) {
        let sessions = sessions.clone();
        tokio::spawn(async move {
            sessions
                .settle(user, reservation, used_tokens, cost_usd)
                .await
        });
    }
}

async fn first_outcome(
    outcome: tokio::sync::oneshot::Receiver<FirstOutcome>,
    wait: bool,
    limit: Duration,
) -> Option<FirstOutcome> {
    if !wait {
        return None;
    }
    tokio::time::timeout(limit, outcome)
        .await
        .ok()
        .and_then(Result::ok)
}

fn router_in(view: &SharedView, node: &str) -> Option<ActorRef<PeerMessage>> {
    view.read()
        .ok()
        .and_then(|v| v.peers.get(node).map(|p| p.router.clone()))
}

fn relay_in(view: &SharedView, node: &str) -> Option<ActorRef<PeerMessage>> {
    view.read()
        .ok()
        .and_then(|v| v.peers.get(node).map(|p| p.relay.clone()))
}

fn unexpected(node: &str) -> SessionError {
    SessionError::Unavailable(format!("home node {node} answered another request"))
}

/// Runs one user-scoped operation on this node's session of `user`.
async fn execute(sessions: &Sessions, user: Uuid, op: SessionOp) -> Result<Value, SessionError> {
    Ok(match op {
        SessionOp::Search(query) => Value::Search(sessions.search(user, query).await?),
        SessionOp::FlushUsage => {
            sessions.flush_usage(user).await?;
            Value::Unit
        }
        SessionOp::CreateThread(new) => Value::Thread(sessions.create_thread(user, new).await?),
        SessionOp::UpdateThread(thread, patch) => {
            Value::Thread(sessions.update_thread(user, thread, patch).await?)
        }
        SessionOp::DeleteThread(thread) => {
            sessions.delete_thread(user, thread).await?;
            Value::Unit
        }
        SessionOp::UpdateProfile(patch) => Value::User(sessions.update_profile(user, patch).await?),
        SessionOp::SetTierRole(change) => Value::User(sessions.set_tier_role(user, change).await?),
        SessionOp::CreateApiKey(key, max) => {
            Value::ApiKey(sessions.create_api_key(user, key, max).await?)
        }
        SessionOp::DeleteApiKey(key) => {
            sessions.delete_api_key(user, key).await?;
            Value::Unit
        }
        SessionOp::PutProviderKey(key) => {
            if key.user_id != user {
                return Err(SessionError::NotFound);
            }
            sessions.put_provider_key(key).await?;
            Value::Unit
        }
        SessionOp::DeleteProviderKey(provider) => {
            sessions.delete_provider_key(user, &provider).await?;
            Value::Unit
        }
        SessionOp::CancelTurn(thread, turn) => {
            sessions.cancel_turn(user, thread, turn).await?;
            Value::Unit
        }
        SessionOp::Summarize(thread, model) => {
            Value::Summary(sessions.summarize(user, thread, model).await?)
        }
        SessionOp::UploadLimit => Value::Bytes(sessions.upload_limit(user).await?),
        SessionOp::CreateDocument(document) => {
            if document.user_id != user {
                return Err(SessionError::NotFound);
            }
            Value::Document(sessions.create_document(document).await?)
        }
        SessionOp::DeleteDocument(document) => {
            sessions.delete_document(user, document).await?;
            Value::Unit
        }
        SessionOp::Admit(model, tokens) => {
            Value::Reservation(sessions.admit(user, &model, tokens).await?)
        }
    })
}

/// The home side of cross-node calls: what this node's router and relay do with what arrives.
pub(crate) struct Dispatcher {
    pub sessions: Sessions,
    pub view: SharedView,
    pub relay: Arc<Relay>,
    pub membership: OnceLock<ActorRef<MembershipMessage>>,
    pub first_wait: Duration,
}

impl Dispatcher {
    /// The relay of the edge node `node`, looked up afresh on every use. A node that just
    /// joined may call us before our heartbeat reached it: wait a moment for it to become a
    /// member rather than refuse.
    async fn peer_relay(&self, node: &str) -> Option<relay::PeerResolver> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while relay_in(&self.view, node).is_none() {
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (view, node) = (self.view.clone(), node.to_owned());
        Some(Arc::new(move || relay_in(&view, &node)))
    }

    async fn answer(self: Arc<Self>, request: Request) -> Reply {
        match request {
            Request::Ping(heartbeat) => {
                if let Some(membership) = self.membership.get() {
                    let _ = membership.cast(MembershipMessage::Heard(heartbeat));
                }
                match self.view.read() {
                    Ok(view) => Reply::Pong(view.heartbeat()),
                    Err(_) => Reply::Refused("cluster view poisoned".into()),
                }
            }
            Request::Session { user, op } => Reply::Session(
                execute(&self.sessions, user, op)
                    .await
                    .map_err(WireError::from),
            ),
            Request::StartTurn {
                user,
                thread,
                send,
                stream,
                wait_first,
            } => Reply::TurnStarted(
                self.start_turn(user, thread, send, stream, wait_first)
                    .await
                    .map(Box::new),
            ),
            Request::OpenStream {
                user,
                thread,
                after,
                stream,
            } => Reply::StreamOpened(self.open_stream(user, thread, after, stream).await),
            Request::OpenLiveTurns {
                user,
                thread,
                after,
                stream,
            } => Reply::LiveTurnsOpened(self.open_live_turns(user, thread, after, stream).await),
            Request::CancelLiveTurn { user, thread, turn } => Reply::Session(
                self.sessions
                    .cancel_live_turn(user, thread, turn)
                    .await
                    .map(|()| Value::Unit)
                    .map_err(WireError::from),
            ),
        }
    }

    async fn start_turn(
        &self,
        user: Uuid,
        thread: Uuid,
        send: SendMessage,
        stream: StreamTarget,
        wait_first: bool,
    ) -> Result<TurnStartedWire, WireError> {
        let peer = self.peer_relay(&stream.origin).await.ok_or_else(|| {
            WireError::Unavailable(format!("node {} is not a member here", stream.origin))
        })?;
        let started = self.sessions.start_turn(user, thread, send).await?;
        self.relay
            .start_pump(started.log.reader(started.from_seq - 1), stream, peer);
        let first_outcome = first_outcome(started.first_outcome, wait_first, self.first_wait).await;
        Ok(TurnStartedWire {
            turn_id: started.turn_id,
            user_message: started.user_message,
            assistant_messages: started.assistant_messages,
            from_seq: started.from_seq,
            first_outcome,
            rate_limit: started.rate_limit,
        })
    }

    async fn open_stream(
        &self,
        user: Uuid,
        thread: Uuid,
        after: Option<u64>,
        stream: StreamTarget,
    ) -> Result<u64, WireError> {
        let peer = self.peer_relay(&stream.origin).await.ok_or_else(|| {
            WireError::Unavailable(format!("node {} is not a member here", stream.origin))
        })?;
        let log = self.sessions.subscribe(user, thread).await?;
        let after = after.unwrap_or_else(|| log.live_start());
        self.relay.start_pump(log.reader(after), stream, peer);
        Ok(after)
    }
}

impl Dispatcher {
    async fn open_live_turns(
        &self,
        user: Uuid,
        thread: Uuid,
        after: Option<u64>,
        stream: StreamTarget,
    ) -> Option<LiveTurnsWire> {
        let live = self.sessions.live_turns(user, thread).await?;
        let peer = self.peer_relay(&stream.origin).await?;
        let after = after.unwrap_or_else(|| live.log.live_start());
        self.relay.start_pump(live.log.reader(after), stream, peer);
        Some(LiveTurnsWire {
            after,
            turns: live.turns,
        })
    }
}

impl Inbox for Dispatcher {
    fn call(
        self: Arc<Self>,
        bytes: Vec<u8>,
    ) -> Pin<Box<dyn std::future::Future<Output = Vec<u8>> + Send>> {
        Box::pin(async move {
            let reply = match codec::decode::<Request>(&bytes) {
                Ok(request) => self.answer(request).await,
                Err(e) => {
                    tracing::warn!(error = %e, "refusing an undecodable cluster request");
                    Reply::Refused(e.to_string())
                }
            };
            codec::encode(&reply).unwrap_or_default()
        })
    }

    fn cast(&self, bytes: Vec<u8>) {
        let cast = match codec::decode::<Cast>(&bytes) {
            Ok(cast) => cast,
            Err(e) => {
                tracing::warn!(error = %e, "dropping an undecodable cluster cast");
                return;
            }
        };
        match cast {
            Cast::Settle {
                user,
                reservation,
                used_tokens,
                cost_usd,
            } => settle_locally(&self.sessions, user, reservation, used_tokens, cost_usd),
            Cast::Limits { user, used } => self.sessions.absorb_used_limits(user, &used),
            Cast::Leaving { name } => {
                if let Some(membership) = self.membership.get() {
                    let _ = membership.cast(MembershipMessage::PeerLeaving(name));
                }
            }
            relayed => self.relay.on_cast(relayed),
        }
    }
}
