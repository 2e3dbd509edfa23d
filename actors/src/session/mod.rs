//! User sessions: one `UserSession` actor per active user owns every change to that user's state.
//!
//! ```text
//! SessionSupervisor ── UserSession(user_a)
//!                   ├─ UserSession(user_b)      spawned on first use, stopped after idle_timeout
//!                   └─ ...
//! ```
//!
//! Changes go through the session so they are serialized per user without locks (ARCHITECTURE.md,
//! principle 1); reads may go straight to the store. The edge talks to sessions only through the
//! [`Sessions`] handle, which finds or spawns the session and retries once when it raced with
//! passivation.
//!
//! For hand-off between nodes (a user's home moves, a node leaves) the handle also lists the
//! users live here ([`Sessions::live_users`]), counts running turns ([`Sessions::running_turns`])
//! and passivates a session on demand once nothing runs in it ([`Sessions::passivate`]).

pub mod context;
pub mod events;
mod ledger;
mod quota;
pub mod retrieval;
mod supervisor;
pub mod turn;
mod user_session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::{ActorRef, RpcReplyPort};
use uuid::Uuid;

use crate::indexer::Documents;
use crate::node::SupervisorSlot;
use crate::provider::catalogue::Catalogue;
use crate::store::{ApiKey, Document, ProviderKey, Role, StoreError, Thread, User};
use ledger::Ledger;
pub use supervisor::{SessionSupervisor, SessionSupervisorArgs, SessionSupervisorMessage};
pub use user_session::{LiveTurns, UserSession, UserSessionMessage, usage_period};

use crate::provider::{KeyOpener, ProviderError};
pub use quota::{Reservation, UsedLimits};

use crate::quota::tiers::Tiers;
use crate::quota::{Admission, Clock, LocalBuckets};
use events::ThreadEvents;
use turn::{FirstOutcome, TurnTimeouts};

/// Tunables of the session layer (`[sessions]` in chorus.toml).
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// A session with no message for this long stops; the next request rebuilds it from the store.
    pub idle_timeout: Duration,
    /// Upper bound for one request to a session (includes queueing behind the user's other work).
    pub call_timeout: Duration,
    /// Provider deadlines of turns.
    pub turn_timeouts: TurnTimeouts,
    /// Opens users' own provider keys; `None`: users' keys are not used.
    pub key_opener: Option<Arc<dyn KeyOpener>>,
    /// The plans users' limits come from.
    pub tiers: Arc<Tiers>,
    /// The clock monthly limits count in (a test's, or the system's).
    pub clock: Clock,
    /// Per-user requests/min and tokens/min. In-process: each user has one home session.
    pub user_buckets: Arc<LocalBuckets>,
    /// Blob store and indexer (set by the node when documents are configured); `None`: document
    /// requests answer `Unavailable`.
    pub documents: Option<Documents>,
    /// Counts the turns running on this node ([`Sessions::running_turns`]). Each node's config
    /// gets its own by default; clones share it.
    pub turn_counter: TurnCounter,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            idle_timeout: Duration::from_secs(600),
            call_timeout: Duration::from_secs(10),
            turn_timeouts: TurnTimeouts::default(),
            key_opener: None,
            tiers: Arc::new(Tiers::unlimited()),
            clock: Clock::system(),
            user_buckets: Arc::new(LocalBuckets::new()),
            documents: None,
            turn_counter: TurnCounter::default(),
        }
    }
}

/// The number of turns running on a node, kept by the turns themselves: each live turn holds a
/// [`TurnGuard`] from start until its session forgets it (finished, crashed or abandoned), so the
/// count cannot drift whatever way a turn ends. Reading it is one atomic load.
#[derive(Debug, Clone, Default)]
pub struct TurnCounter(Arc<AtomicUsize>);

impl TurnCounter {
    /// Turns running now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    /// Counts one more running turn until the guard drops.
    pub(crate) fn enter(&self) -> TurnGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        TurnGuard(self.0.clone())
    }
}

/// One running turn in a [`TurnCounter`].
#[derive(Debug)]
pub(crate) struct TurnGuard(Arc<AtomicUsize>);

impl Drop for TurnGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`Sessions::passivate`] did with a user's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Passivation {
    /// The session wrote what it held in memory to the store and stopped; the next request for
    /// the user rebuilds it from the store (on whichever node is then its home).
    Stopped,
    /// Work is running in the session — turns, or `/v1` requests admitted and not yet settled
    /// (`running_turns` counts both) — so it was left running.
    Busy { running_turns: usize },
    /// The user has no live session on this node.
    NotLive,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The resource does not exist or belongs to another user (the edge answers 404 for both).
    #[error("not found")]
    NotFound,
    /// A document named by a message or a search is not the user's (or gone): 404 naming it,
    /// whatever the request's main resource is.
    #[error("document not found")]
    DocumentNotFound,
    /// The change would break a rule of the user's data (e.g. too many API keys).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The request cannot be served as asked (e.g. an unknown model); the message says why.
    #[error("{0}")]
    Invalid(String),
    /// A provider call the request needed failed.
    #[error(transparent)]
    Provider(ProviderError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The session could not be reached or did not answer in time.
    #[error("user session unavailable: {0}")]
    Unavailable(String),
    /// The user's tier does not allow this (e.g. a model); the message says what.
    #[error("{0}")]
    Forbidden(String),
    /// A per-minute bucket of the user's tier is empty (`what`: `requests_per_minute` or
    /// `tokens_per_minute`).
    #[error("rate limit reached: {what} ({limit})")]
    RateLimited {
        what: String,
        limit: u64,
        remaining: u64,
        retry_after: Duration,
        reset_after: Duration,
    },
    /// An upload is larger than the user's tier allows (`limit` bytes).
    #[error("{what} exceeds the limit of your plan ({limit} bytes)")]
    TooLarge { what: String, limit: u64 },
    /// A monthly limit of the user's tier is used up until `resets_at`.
    #[error("monthly quota exceeded: {what} ({used} of {limit})")]
    QuotaExceeded {
        what: String,
        limit: u64,
        used: u64,
        resets_at: chrono::DateTime<chrono::Utc>,
    },
}

/// `POST /api/v1/search`, validated by the edge (the query embedded there, off the session).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SearchQuery {
    pub query: String,
    pub embedding: Option<Vec<f32>>,
    /// Only these documents (each must be the user's and ready).
    pub document_ids: Option<Vec<Uuid>>,
    pub top_k: usize,
}

/// Fields of `POST /api/v1/threads`, validated by the edge.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct NewThread {
    pub title: Option<String>,
    pub system_prompt: Option<String>,
    pub model: Option<String>,
}

/// `PATCH /api/v1/threads/{id}`: `None` leaves a field alone, `Some(None)` clears it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ThreadPatch {
    pub title: Option<Option<String>>,
    pub system_prompt: Option<Option<String>>,
    pub model: Option<Option<String>>,
    pub bookmarked: Option<bool>,
}

/// `POST /api/v1/threads/{id}/messages`, validated by the edge.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SendMessage {
    pub content: String,
    /// Empty: the thread's model, else the user's default, else the first enabled chat model.
    pub models: Vec<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    /// Documents to answer from (each the user's and ready).
    pub document_ids: Vec<Uuid>,
    /// The message embedded by the edge, for retrieval among `document_ids`.
    pub query_embedding: Option<Vec<f32>>,
}

/// A turn that has started: its stored user message and assistant placeholders, and where to
/// read its events (every event of this turn has `seq >= from_seq`).
pub struct TurnStarted {
    pub turn_id: Uuid,
    pub user_message: crate::store::Message,
    pub assistant_messages: Vec<crate::store::Message>,
    pub log: std::sync::Arc<ThreadEvents>,
    pub from_seq: u64,
    /// Resolves once some model produced output, or every model failed before any.
    pub first_outcome: tokio::sync::oneshot::Receiver<FirstOutcome>,
    /// The user's requests-per-minute bucket after this request (for `X-RateLimit-*`).
    pub rate_limit: Admission,
}

/// `PATCH /api/v1/me`: `None` leaves a field alone, `Some(None)` clears it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ProfilePatch {
    pub display_name: Option<Option<String>>,
    pub default_model: Option<Option<String>>,
    pub temperature: Option<Option<f64>>,
    pub system_prompt: Option<Option<String>>,
}

/// A change of a user's plan or role, by an admin or the billing webhook; `None` leaves a field
/// alone. The tier is validated against the configured tiers by the caller.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TierRoleChange {
    pub tier: Option<String>,
    pub role: Option<Role>,
}

/// A session that can still take messages. A freshly spawned actor reports `Starting` for a
/// moment after `spawn` returns; treating that as dead would spawn a second session for the same
/// user and break per-user serialization.
pub(crate) fn is_alive<M: ractor::Message>(actor: &ActorRef<M>) -> bool {
    ractor::ACTIVE_STATES.contains(&actor.get_status())
}

/// A live session: its actor, and the limits state it shares with the edge.
#[derive(Clone)]
pub struct LiveSession {
    pub(crate) actor: ActorRef<UserSessionMessage>,
    pub(crate) ledger: Arc<Ledger>,
}

pub(crate) type LiveSessions = Arc<RwLock<HashMap<Uuid, LiveSession>>>;

/// The edge's handle on the sessions of this node. Cheap to clone.
#[derive(Clone)]
pub struct Sessions {
    supervisor: SupervisorSlot,
    live: LiveSessions,
    catalogue: Arc<Catalogue>,
    call_timeout: Duration,
    turn_counter: TurnCounter,
    user_buckets: Arc<LocalBuckets>,
}

impl Sessions {
    pub(crate) fn new(
        supervisor: SupervisorSlot,
        live: LiveSessions,
        catalogue: Arc<Catalogue>,
        config: &SessionConfig,
    ) -> Self {
        Sessions {
            supervisor,
            live,
            catalogue,
            call_timeout: config.call_timeout,
            turn_counter: config.turn_counter.clone(),
            user_buckets: config.user_buckets.clone(),
        }
    }

    /// Takes the user's per-minute buckets out of this node, for its new home (hand-off).
    pub fn take_used_limits(&self, user_id: Uuid) -> UsedLimits {
        UsedLimits::take(&self.user_buckets, user_id)
    }

    /// Adds what the user's previous home used of its per-minute limits.
    pub fn absorb_used_limits(&self, user_id: Uuid, used: &UsedLimits) {
        used.absorb_into(&self.user_buckets, user_id);
    }

    /// Number of sessions currently alive on this node.
    pub fn live_count(&self) -> usize {
        self.live.read().map(|m| m.len()).unwrap_or(0)
    }

    /// The users with a live session on this node (in no particular order).
    pub fn live_users(&self) -> Vec<Uuid> {
        self.live
            .read()
            .map(|m| {
                m.iter()
                    .filter(|(_, session)| is_alive(&session.actor))
                    .map(|(user_id, _)| *user_id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Turns running on this node now (one atomic load).
    pub fn running_turns(&self) -> usize {
        self.turn_counter.get()
    }

    /// Hands a user's session off (its home moved, or this node is leaving): when nothing runs
    /// in it, it writes what it holds in memory (pending usage counters) to the store, ends its
    /// event logs (readers see them end and reconnect), stops, and is forgotten — the next
    /// request rebuilds it from the store. When turns (or admitted `/v1` requests) run, it is
    /// left alone and answers `Busy`; ask again once they end. Never spawns a session.
    ///
    /// Requests already queued behind the hand-off are not served by the stopped session: they
    /// fail as if the session had passivated when idle (reads are retried on a fresh one).
    pub async fn passivate(&self, user_id: Uuid) -> Result<Passivation, SessionError> {
        let Some(session) = self.live_session(user_id) else {
            return Ok(Passivation::NotLive);
        };
        match self
            .call_once(&session, UserSessionMessage::Passivate)
            .await
        {
            Ok(Ok(Passivation::Stopped)) => {
                // Wait for the end, so that a request after this answer meets a fresh session.
                if session.wait(Some(self.call_timeout)).await.is_err() {
                    return Err(SessionError::Unavailable(
                        "the session did not stop in time".into(),
                    ));
                }
                self.forget(user_id, &session);
                Ok(Passivation::Stopped)
            }
            Ok(answer) => answer,
            // It stopped on its own meanwhile (idle), after writing what it held.
            Err(_gone) => {
                self.forget(user_id, &session);
                Ok(Passivation::NotLive)
            }
        }
    }

    /// Searches the user's ready documents (hybrid when `query.embedding` is given and chunks
    /// have vectors); counts against the tier's monthly RAG limit.
    pub async fn search(
        &self,
        user_id: Uuid,
        query: SearchQuery,
    ) -> Result<retrieval::SearchResults, SessionError> {
        self.request(user_id, |reply| {
            UserSessionMessage::Search(query.clone(), reply)
        })
        .await
    }

    /// Writes the user's pending usage counters, so a read of the `usage` table that follows
    /// sees every settled request (used by `/me/usage`).
    pub async fn flush_usage(&self, user_id: Uuid) -> Result<(), SessionError> {
        self.request(user_id, |reply| UserSessionMessage::FlushUsage(Some(reply)))
            .await
    }

    pub async fn create_thread(
        &self,
        user_id: Uuid,
        new: NewThread,
    ) -> Result<Thread, SessionError> {
        self.request(user_id, |reply| {
            UserSessionMessage::CreateThread(new.clone(), reply)
        })
        .await
    }

    pub async fn update_thread(
        &self,
        user_id: Uuid,
        thread_id: Uuid,
        patch: ThreadPatch,
    ) -> Result<Thread, SessionError> {
        self.request(user_id, |reply| {
            UserSessionMessage::UpdateThread(thread_id, patch.clone(), reply)
        })
        .await
    }

    pub async fn delete_thread(&self, user_id: Uuid, thread_id: Uuid) -> Result<(), SessionError> {
        self.request(user_id, |reply| {
            UserSessionMessage::DeleteThread(thread_id, reply)
        })
        .await
    }

    pub async fn update_profile(
        &self,
        user_id: Uuid,
        patch: ProfilePatch,
    ) -> Result<User, SessionError> {
        self.request(user_id, |reply| {
            UserSessionMessage::UpdateProfile(patch.clone(), reply)
        })
        .await
    }

    /// Changes the user's tier and/or role; the stored user after the change.
    pub async fn set_tier_role(
        &self,
        user_id: Uuid,
        change: TierRoleChange,
    ) -> Result<User, SessionError> {
        self.request(user_id, |reply| {
            UserSessionMessage::SetTierRole(change.clone(), reply)
        })
        .await
    }

    /// Stores a new API key unless the user already holds `max_keys`.
    pub async fn create_api_key(
        &self,
        user_id: Uuid,
        key: ApiKey,
        max_keys: usize,
    ) -> Result<ApiKey, SessionError> {
        self.request(user_id, |reply| {
            UserSessionMessage::CreateApiKey(key.clone(), max_keys, reply)
        })
        .await
    }

    pub async fn delete_api_key(&self, user_id: Uuid, key_id: Uuid) -> Result<(), SessionError> {
        self.request(user_id, |reply| {
            UserSessionMessage::DeleteApiKey(key_id, reply)
        })
        .await
    }

    /// Stores (or replaces) the user's sealed key for one provider.
    pub async fn put_provider_key(&self, key: ProviderKey) -> Result<(), SessionError> {
        let user_id = key.user_id;
        self.request(user_id, |reply| {
            UserSessionMessage::PutProviderKey(key.clone(), reply)
        })
        .await
    }

    pub async fn delete_provider_key(
        &self,
        user_id: Uuid,
        provider: &str,
    ) -> Result<(), SessionError> {
        self.request(user_id, |reply| {
            UserSessionMessage::DeleteProviderKey(provider.to_owned(), reply)
        })
        .await
    }

    /// Stores the user message and starts a turn. Returns once the turn runs (not when it ends).
    pub async fn start_turn(
        &self,
        user_id: Uuid,
        thread_id: Uuid,
        send: SendMessage,
    ) -> Result<TurnStarted, SessionError> {
        // Not retried: a lost reply after the message was stored must not store it twice.
        let session = self.session(user_id).await?;
        let build = |reply| UserSessionMessage::StartTurn(thread_id, send, reply);
        match self.call_once(&session, build).await {
            Ok(answer) => answer,
            Err(gone) => {
                self.forget(user_id, &session);
                Err(SessionError::Unavailable(gone))
            }
        }
    }

    /// Checks the user's tier and limits for one request to `model_id` outside a thread (the
    /// OpenAI-compatible API) and reserves `estimated_tokens`. Settle the reservation exactly
    /// once with [`Sessions::settle`], whatever happens to the request.
    ///
    /// When the user's session is live and has loaded what the check needs, this takes its
    /// ledger's lock and no message (the hot path of `/v1`, see `ledger`); else the session
    /// does it, and loads what the next request needs.
    pub async fn admit(
        &self,
        user_id: Uuid,
        model_id: &str,
        estimated_tokens: u64,
    ) -> Result<Reservation, SessionError> {
        if let Some(live) = self.live_entry(user_id)
            && let Some(model) = self.catalogue.get(model_id)
            && let Some(answer) =
                live.ledger
                    .admit_request_now(&model.spec.id, &model.spec.tiers, estimated_tokens)
        {
            return answer;
        }
        // Not retried after an answer: a lost reply would leak a reservation (it still refills).
        let session = self.session(user_id).await?;
        let model_id = model_id.to_owned();
        let build = |reply| UserSessionMessage::Admit(model_id, estimated_tokens, reply);
        match self.call_once(&session, build).await {
            Ok(answer) => answer,
            Err(gone) => {
                self.forget(user_id, &session);
                Err(SessionError::Unavailable(gone))
            }
        }
    }

    /// [`Sessions::settle`] without waiting or spawning when the user's session is live (the
    /// common case: it admitted the request moments ago): in its ledger, under its lock, with
    /// no message (but one per second or so to write the usage). Hands the reservation back
    /// when there is no live session to take it; settle it with [`Sessions::settle`] then.
    pub fn try_settle(
        &self,
        user_id: Uuid,
        reservation: Reservation,
        used_tokens: u64,
        cost_usd: f64,
    ) -> Option<Reservation> {
        let Some(live) = self.live_entry(user_id) else {
            return Some(reservation);
        };
        match live
            .ledger
            .settle_request(reservation, used_tokens, cost_usd)
        {
            Ok(flush_due) => {
                if flush_due {
                    live.actor.send_after(user_session::USAGE_FLUSH_AFTER, || {
                        UserSessionMessage::FlushUsage(None)
                    });
                }
                None
            }
            Err(reservation) => Some(*reservation),
        }
    }

    /// Settles a reservation from [`Sessions::admit`] with what the request really used, and
    /// records the usage. A message to the session (nothing to wait for); the reservation is
    /// consumed, so it is settled exactly once.
    pub async fn settle(
        &self,
        user_id: Uuid,
        reservation: Reservation,
        used_tokens: u64,
        cost_usd: f64,
    ) {
        let mut message = UserSessionMessage::Settle(reservation, used_tokens, cost_usd);
        for _attempt in 0..2 {
            let session = match self.session(user_id).await {
                Ok(session) => session,
                Err(e) => {
                    tracing::error!(%user_id, error = %e, "settling a reservation: no session");
                    return;
                }
            };
            match session.cast(message) {
                Ok(()) => return,
                Err(ractor::MessagingErr::SendErr(back)) => {
                    // The session stopped between lookup and delivery: once more, on a fresh one.
                    self.forget(user_id, &session);
                    message = back;
                }
                Err(e) => {
                    tracing::error!(%user_id, error = %e, "settling a reservation failed");
                    return;
                }
            }
        }
        tracing::error!(%user_id, "settling a reservation: the session kept stopping");
    }

    /// The event log of one of the user's threads.
    pub async fn subscribe(
        &self,
        user_id: Uuid,
        thread_id: Uuid,
    ) -> Result<std::sync::Arc<ThreadEvents>, SessionError> {
        self.request(user_id, |reply| {
            UserSessionMessage::Subscribe(thread_id, reply)
        })
        .await
    }

    /// The turns running in one of the user's threads here, with the thread's log; `None`
    /// when none run (or the user has no live session here). Never spawns a session: this is
    /// how the node a turn started on is asked for it after the user's home moved.
    pub async fn live_turns(&self, user_id: Uuid, thread_id: Uuid) -> Option<LiveTurns> {
        let session = self.live_session(user_id)?;
        self.call_once(&session, |reply| {
            UserSessionMessage::LiveTurns(thread_id, reply)
        })
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
    }

    /// Cancels a turn running in a live session here; never spawns one (see `live_turns`).
    pub async fn cancel_live_turn(
        &self,
        user_id: Uuid,
        thread_id: Uuid,
        turn_id: Uuid,
    ) -> Result<(), SessionError> {
        let session = self.live_session(user_id).ok_or(SessionError::NotFound)?;
        self.call_once(&session, |reply| {
            UserSessionMessage::CancelTurn(thread_id, turn_id, reply)
        })
        .await
        .unwrap_or(Err(SessionError::NotFound))
    }

    fn live_session(&self, user_id: Uuid) -> Option<ActorRef<UserSessionMessage>> {
        self.live_entry(user_id).map(|live| live.actor)
    }

    fn live_entry(&self, user_id: Uuid) -> Option<LiveSession> {
        self.live
            .read()
            .ok()
            .and_then(|m| m.get(&user_id).cloned())
            .filter(|live| is_alive(&live.actor))
    }

    pub async fn cancel_turn(
        &self,
        user_id: Uuid,
        thread_id: Uuid,
        turn_id: Uuid,
    ) -> Result<(), SessionError> {
        self.request(user_id, |reply| {
            UserSessionMessage::CancelTurn(thread_id, turn_id, reply)
        })
        .await
    }

    pub async fn summarize(
        &self,
        user_id: Uuid,
        thread_id: Uuid,
        model: Option<String>,
    ) -> Result<crate::store::Summary, SessionError> {
        self.request(user_id, |reply| {
            UserSessionMessage::Summarize(thread_id, model.clone(), reply)
        })
        .await
    }

    /// The largest document upload the user's tier allows, in bytes.
    pub async fn upload_limit(&self, user_id: Uuid) -> Result<u64, SessionError> {
        self.request(user_id, UserSessionMessage::UploadLimit).await
    }

    /// Records an uploaded document (its blob already stored) as `pending` and queues its
    /// ingestion. Fails with `TooLarge` when its size exceeds the user's tier.
    pub async fn create_document(&self, document: Document) -> Result<Document, SessionError> {
        let user_id = document.user_id;
        // Not retried after an answer: the row would be stored twice under one id (a conflict).
        let session = self.session(user_id).await?;
        let build = |reply| UserSessionMessage::CreateDocument(document, reply);
        match self.call_once(&session, build).await {
            Ok(answer) => answer,
            Err(gone) => {
                self.forget(user_id, &session);
                Err(SessionError::Unavailable(gone))
            }
        }
    }

    /// Deletes a document with its chunks and blob, stopping its ingestion.
    pub async fn delete_document(
        &self,
        user_id: Uuid,
        document_id: Uuid,
    ) -> Result<(), SessionError> {
        self.request(user_id, |reply| {
            UserSessionMessage::DeleteDocument(document_id, reply)
        })
        .await
    }

    /// Sends a request to the user's session and waits for the answer. A session that stopped
    /// between lookup and delivery (idle passivation) drops the message unprocessed, so one retry
    /// against a fresh session is safe.
    async fn request<T, F>(&self, user_id: Uuid, build: F) -> Result<T, SessionError>
    where
        T: Send + 'static,
        F: Fn(RpcReplyPort<Result<T, SessionError>>) -> UserSessionMessage,
    {
        let mut last_error = String::new();
        for _attempt in 0..2 {
            let session = self.session(user_id).await?;
            match self.call_once(&session, &build).await {
                Ok(answer) => return answer,
                Err(gone) => last_error = gone,
            }
            self.forget(user_id, &session);
        }
        Err(SessionError::Unavailable(last_error))
    }

    /// One call to a session. `Err(reason)` means the session went away without handling the
    /// message (safe to retry on a fresh one); a timeout is an answer, as the message may still
    /// be handled.
    async fn call_once<T, F>(
        &self,
        session: &ActorRef<UserSessionMessage>,
        build: F,
    ) -> Result<Result<T, SessionError>, String>
    where
        T: Send + 'static,
        F: FnOnce(RpcReplyPort<Result<T, SessionError>>) -> UserSessionMessage,
    {
        match session.call(build, Some(self.call_timeout)).await {
            Ok(ractor::rpc::CallResult::Success(answer)) => Ok(answer),
            Ok(ractor::rpc::CallResult::Timeout) => Ok(Err(SessionError::Unavailable(
                "session call timed out".into(),
            ))),
            Ok(ractor::rpc::CallResult::SenderError) => {
                Err("session stopped before answering".into())
            }
            Err(err) => Err(err.to_string()),
        }
    }

    async fn session(&self, user_id: Uuid) -> Result<ActorRef<UserSessionMessage>, SessionError> {
        let cached = self
            .live
            .read()
            .ok()
            .and_then(|m| m.get(&user_id).map(|live| live.actor.clone()));
        if let Some(session) = cached
            && is_alive(&session)
        {
            return Ok(session);
        }
        let supervisor = self
            .supervisor
            .read()
            .ok()
            .and_then(|slot| slot.clone())
            .ok_or_else(|| SessionError::Unavailable("session supervisor not running".into()))?;
        ractor::call_t!(
            supervisor,
            SessionSupervisorMessage::GetOrSpawn,
            self.call_timeout.as_millis() as u64,
            user_id
        )
        .map_err(|e| SessionError::Unavailable(e.to_string()))?
        .map_err(SessionError::Unavailable)
    }

    fn forget(&self, user_id: Uuid, session: &ActorRef<UserSessionMessage>) {
        if let Ok(mut map) = self.live.write()
            && map.get(&user_id).map(|s| s.actor.get_id()) == Some(session.get_id())
        {
            map.remove(&user_id);
        }
    }
}
