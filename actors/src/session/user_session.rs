//! `UserSession`: the home of one user's state on this node.
//!
//! Every change to the user's threads and profile is a message here, handled one at a time, so
//! two concurrent requests of the same user never interleave their read-modify-write. It owns the
//! user's live turns (children `Turn` actors) and the per-thread event logs clients read, and
//! stops itself after `idle_timeout` without messages — but never while a turn runs or a client
//! is still reading a log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;
use serde_json::json;
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use super::context::{self, count_tokens};
use super::events::ThreadEvents;
use super::ledger::{Holder, Ledger};
use super::quota::{Quotas, Reservation, turn_usage, write_usage};
use super::retrieval::{Passage, Retrieval, SearchResults};
use super::turn::{LegResult, Turn, TurnArgs, TurnLeg, TurnTimeouts};
use super::{
    NewThread, Passivation, ProfilePatch, SearchQuery, SendMessage, SessionError, ThreadPatch,
    TierRoleChange, TurnCounter, TurnGuard, TurnStarted,
};
use crate::indexer::Documents;
use crate::provider::catalogue::{Catalogue, Model};
use crate::provider::routing::{self, RouteOptions};
use crate::provider::{ChatMessage, ChatRequest, ChatRole, KeyOpener};
use crate::store::{
    ApiKey, Citation, Document, Message, MessageQuery, MessageRole, MessageStatus, Order,
    ProviderKey, Store, Summary, Thread, Usage, User,
};

pub struct UserSession;

pub struct UserSessionArgs {
    pub user_id: Uuid,
    pub store: Arc<dyn Store>,
    pub catalogue: Arc<Catalogue>,
    pub idle_timeout: Duration,
    pub turn_timeouts: TurnTimeouts,
    pub key_opener: Option<Arc<dyn KeyOpener>>,
    pub documents: Option<Documents>,
    /// The user's limits state, shared with the edge (which admits `/v1` requests there).
    pub ledger: Arc<Ledger>,
    /// The node's count of running turns; each live turn holds a place in it.
    pub turn_counter: TurnCounter,
}

/// A turn that is still running.
/// The turns running in one thread of a session, with the thread's log.
pub struct LiveTurns {
    pub log: Arc<ThreadEvents>,
    pub turns: Vec<Uuid>,
}

struct LiveTurn {
    thread_id: Uuid,
    cancel: watch::Sender<bool>,
    actor: ActorId,
    message_ids: Vec<Uuid>,
    /// Models whose context dropped older messages: a summary is due after the turn.
    summarize: Vec<String>,
    /// The thread had no title when the turn started: give it one from the first exchange.
    title_from: Option<(String, Model)>,
    /// Its admission, settled once when the turn ends however it ends.
    reservation: Reservation,
    /// Counts it among the node's running turns while the session holds it.
    _running: TurnGuard,
}

pub struct UserSessionState {
    user_id: Uuid,
    store: Arc<dyn Store>,
    catalogue: Arc<Catalogue>,
    idle_timeout: Duration,
    turn_timeouts: TurnTimeouts,
    key_opener: Option<Arc<dyn KeyOpener>>,
    idle_timer: Option<JoinHandle<()>>,
    /// Event logs by thread, kept while the session lives so clients can resume.
    logs: HashMap<Uuid, Arc<ThreadEvents>>,
    turns: HashMap<Uuid, LiveTurn>,
    quotas: Quotas,
    /// The user row, opened keys, usage counters and what live requests hold: shared with the
    /// edge, which admits and settles `/v1` requests there without a message (see `ledger`).
    ledger: Arc<Ledger>,
    documents: Option<Documents>,
    /// The user's document index, built on first use.
    retrieval: Option<Retrieval>,
    turn_counter: TurnCounter,
}

#[derive(RactorMessage)]
pub enum UserSessionMessage {
    CreateThread(NewThread, RpcReplyPort<Result<Thread, SessionError>>),
    UpdateThread(
        Uuid,
        ThreadPatch,
        RpcReplyPort<Result<Thread, SessionError>>,
    ),
    DeleteThread(Uuid, RpcReplyPort<Result<(), SessionError>>),
    UpdateProfile(ProfilePatch, RpcReplyPort<Result<User, SessionError>>),
    /// An admin's or the billing webhook's change of tier and/or role.
    SetTierRole(TierRoleChange, RpcReplyPort<Result<User, SessionError>>),
    /// A key (hashed by the edge) and the most keys the user may hold.
    CreateApiKey(ApiKey, usize, RpcReplyPort<Result<ApiKey, SessionError>>),
    DeleteApiKey(Uuid, RpcReplyPort<Result<(), SessionError>>),
    PutProviderKey(ProviderKey, RpcReplyPort<Result<(), SessionError>>),
    DeleteProviderKey(String, RpcReplyPort<Result<(), SessionError>>),
    /// Stores the user message, then starts a `Turn` answering it.
    StartTurn(
        Uuid,
        SendMessage,
        RpcReplyPort<Result<TurnStarted, SessionError>>,
    ),
    /// The event log of a thread the user owns, to read live and past events.
    Subscribe(Uuid, RpcReplyPort<Result<Arc<ThreadEvents>, SessionError>>),
    /// Cancels a live turn of a thread.
    CancelTurn(Uuid, Uuid, RpcReplyPort<Result<(), SessionError>>),
    /// The thread's log and the turns running in it, if any run (after a hand-off, a turn
    /// keeps running on its old home; edges elsewhere still reach its events this way).
    LiveTurns(Uuid, RpcReplyPort<Result<Option<LiveTurns>, SessionError>>),
    /// Folds the older part of a model's conversation into its summary now.
    Summarize(
        Uuid,
        Option<String>,
        RpcReplyPort<Result<Summary, SessionError>>,
    ),
    /// Admits one request to a model outside a thread (`/v1`): tier, monthly and per-minute
    /// limits; the reservation comes back to be settled with `Settle`.
    Admit(String, u64, RpcReplyPort<Result<Reservation, SessionError>>),
    /// Settles an `Admit` reservation with the tokens used and the cost, and records usage.
    Settle(Reservation, u64, f64),
    /// Sent by a `Turn` after every leg is stored and `done` is logged.
    TurnFinished {
        turn_id: Uuid,
        thread_id: Uuid,
        results: Vec<LegResult>,
    },
    /// A generated title replacing the provisional one (from a background task).
    TitleGenerated(Uuid, String, String),
    /// A summary computed off the mailbox, to store (and to answer with, when asked for).
    SummaryComputed(Summary, Option<RpcReplyPort<Result<Summary, SessionError>>>),
    /// Periodic self-check: stop when idle for `idle_timeout`.
    IdleCheck,
    /// Searches the user's documents.
    Search(
        SearchQuery,
        RpcReplyPort<Result<SearchResults, SessionError>>,
    ),
    /// Writes pending usage counters to the store (from a timer, or before `/me/usage` reads).
    FlushUsage(Option<RpcReplyPort<Result<(), SessionError>>>),
    /// The tier's largest upload, in bytes.
    UploadLimit(RpcReplyPort<Result<u64, SessionError>>),
    /// Stores an uploaded document's row (its blob is stored) and queues its ingestion.
    CreateDocument(Document, RpcReplyPort<Result<Document, SessionError>>),
    /// Deletes a document, its chunks and its blob; stops its ingestion.
    DeleteDocument(Uuid, RpcReplyPort<Result<(), SessionError>>),
    /// Hand-off: unless turns or `/v1` requests run, write what is held in memory, end the
    /// event logs and stop (`Stopped`); else answer `Busy` and carry on.
    Passivate(RpcReplyPort<Result<Passivation, SessionError>>),
}

impl Actor for UserSession {
    type Msg = UserSessionMessage;
    type State = UserSessionState;
    type Arguments = UserSessionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Check a few times per timeout so a session outlives its last message by at most ~1.25×.
        let period = (args.idle_timeout / 4).max(Duration::from_millis(10));
        let idle_timer = myself.send_interval(period, || UserSessionMessage::IdleCheck);
        Ok(UserSessionState {
            user_id: args.user_id,
            store: args.store,
            catalogue: args.catalogue,
            idle_timeout: args.idle_timeout,
            turn_timeouts: args.turn_timeouts,
            key_opener: args.key_opener,
            idle_timer: Some(idle_timer),
            logs: HashMap::new(),
            turns: HashMap::new(),
            quotas: args.ledger.quotas.clone(),
            ledger: args.ledger,
            documents: args.documents,
            retrieval: None,
            turn_counter: args.turn_counter,
        })
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(timer) = state.idle_timer.take() {
            timer.abort();
        }
        // Nothing more is admitted or settled here: the edge goes to a fresh session.
        state.ledger.lock().closed = true;
        // Stopping with turns still running (node shutdown): cancel them, let them store what
        // they have as `interrupted`, then settle anything they could not.
        for turn in state.turns.values() {
            turn.cancel.send_replace(true);
        }
        myself
            .stop_children_and_wait(None, Some(Duration::from_secs(5)))
            .await;
        let turns: Vec<(Uuid, LiveTurn)> = state.turns.drain().collect();
        for (turn_id, turn) in turns {
            settle_abandoned(state, turn_id, turn, "the server stopped during this turn").await;
        }
        // Passivating or shutting down: usage still pending is written now.
        flush_usage(state).await;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, error) = event {
            let failed = state
                .turns
                .iter()
                .find(|(_, t)| t.actor == cell.get_id())
                .map(|(id, _)| *id);
            if let Some(turn_id) = failed
                && let Some(turn) = state.turns.remove(&turn_id)
            {
                tracing::error!(%turn_id, error = %error, "turn crashed; settling it as failed");
                settle_abandoned(state, turn_id, turn, "the turn failed unexpectedly").await;
            }
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Replies are best-effort: a caller that timed out has gone, and the work is done anyway.
        match message {
            UserSessionMessage::IdleCheck => {
                // Events stay replayable for LOG_RETENTION after a thread's last event; logs
                // that are quiet that long, unwatched and without a live turn are dropped.
                let live: std::collections::HashSet<Uuid> =
                    state.turns.values().map(|t| t.thread_id).collect();
                state.logs.retain(|thread_id, log| {
                    live.contains(thread_id)
                        || Arc::strong_count(log) > 1
                        || log.quiet_for() < LOG_RETENTION
                });
                // Readers hold the log's Arc: a client still watching keeps the session alive,
                // or it would wait on a log no turn writes to any more.
                let watched = state.logs.values().any(|log| Arc::strong_count(log) > 1);
                // Closed in the same lock as the check: no request is admitted in between.
                let idle = {
                    let mut ledger = state.ledger.lock();
                    let idle = state.turns.is_empty()
                        && ledger.open.is_empty()
                        && !watched
                        && ledger.last_active.elapsed() >= state.idle_timeout;
                    ledger.closed |= idle;
                    idle
                };
                if idle {
                    tracing::debug!(user_id = %state.user_id, "passivating idle user session");
                    myself.stop(Some("idle".into()));
                }
                return Ok(());
            }
            UserSessionMessage::Passivate(reply) => {
                let result = passivate(state).await;
                if matches!(result, Ok(Passivation::Stopped)) {
                    if let Some(timer) = state.idle_timer.take() {
                        timer.abort();
                    }
                    tracing::debug!(user_id = %state.user_id, "passivating user session for hand-off");
                    myself.stop(Some("passivated".into()));
                }
                let _ = reply.send(result);
                return Ok(());
            }
            UserSessionMessage::CreateThread(new, reply) => {
                let _ = reply.send(create_thread(state, new).await);
            }
            UserSessionMessage::UpdateThread(thread_id, patch, reply) => {
                let _ = reply.send(update_thread(state, thread_id, patch).await);
            }
            UserSessionMessage::DeleteThread(thread_id, reply) => {
                let result = delete_thread(state, thread_id).await;
                if result.is_ok() {
                    // Its turns stop and its events go with it; readers see the log end.
                    for turn in state.turns.values().filter(|t| t.thread_id == thread_id) {
                        turn.cancel.send_replace(true);
                    }
                    if let Some(log) = state.logs.remove(&thread_id) {
                        log.close();
                    }
                }
                let _ = reply.send(result);
            }
            UserSessionMessage::UpdateProfile(patch, reply) => {
                let result = update_profile(state, patch).await;
                state.ledger.lock().user = result.as_ref().ok().cloned();
                let _ = reply.send(result);
            }
            UserSessionMessage::SetTierRole(change, reply) => {
                let result = set_tier_role(state, change).await;
                state.ledger.lock().user = result.as_ref().ok().cloned();
                let _ = reply.send(result);
            }
            UserSessionMessage::CreateApiKey(key, max_keys, reply) => {
                let _ = reply.send(create_api_key(state, key, max_keys).await);
            }
            UserSessionMessage::DeleteApiKey(key_id, reply) => {
                let _ = reply.send(delete_api_key(state, key_id).await);
            }
            UserSessionMessage::PutProviderKey(key, reply) => {
                state.ledger.lock().own_keys = None;
                let result = if key.user_id == state.user_id {
                    state.store.put_provider_key(&key).await.map_err(Into::into)
                } else {
                    Err(SessionError::NotFound)
                };
                let _ = reply.send(result);
            }
            UserSessionMessage::StartTurn(thread_id, send, reply) => {
                // A caller that timed out waiting in this mailbox was told the request failed;
                // starting (and billing) its turn now would surprise it with a duplicate later.
                if reply.is_closed() {
                    tracing::warn!(%thread_id, "skipping a turn whose caller gave up waiting");
                } else {
                    let _ = reply.send(start_turn(&myself, state, thread_id, send).await);
                }
            }
            UserSessionMessage::Admit(model_id, estimate, reply) => {
                let result = admit_request(state, &model_id, estimate).await;
                // A caller that gave up waiting never settles: take the reservation back now.
                if let Err(ractor::MessagingErr::SendErr(Ok(reservation))) = reply.send(result) {
                    state.ledger.refund(reservation);
                }
            }
            UserSessionMessage::Settle(reservation, used_tokens, cost_usd) => {
                // Usually settled by the edge in the ledger; this is the way for a reservation
                // whose session stopped meanwhile (see `Sessions::settle`).
                if state
                    .ledger
                    .settle_request_in_session(reservation, used_tokens, cost_usd)
                {
                    myself.send_after(USAGE_FLUSH_AFTER, || UserSessionMessage::FlushUsage(None));
                }
            }
            UserSessionMessage::Search(query, reply) => {
                let result = search(&myself, state, query).await;
                let _ = reply.send(result);
            }
            UserSessionMessage::FlushUsage(reply) => {
                state.ledger.lock().flush_scheduled = false;
                flush_usage(state).await;
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(()));
                }
            }
            UserSessionMessage::Subscribe(thread_id, reply) => {
                let _ = reply.send(subscribe(state, thread_id).await);
            }
            UserSessionMessage::LiveTurns(thread_id, reply) => {
                let mut turns: Vec<Uuid> = state
                    .turns
                    .iter()
                    .filter(|(_, turn)| turn.thread_id == thread_id)
                    .map(|(id, _)| *id)
                    .collect();
                turns.sort_unstable();
                let live = match state.logs.get(&thread_id) {
                    Some(log) if !turns.is_empty() => Some(LiveTurns {
                        log: log.clone(),
                        turns,
                    }),
                    _ => None,
                };
                let _ = reply.send(Ok(live));
            }
            UserSessionMessage::CancelTurn(thread_id, turn_id, reply) => {
                let result = match state.turns.get(&turn_id) {
                    Some(turn) if turn.thread_id == thread_id => {
                        turn.cancel.send_replace(true);
                        Ok(())
                    }
                    _ => Err(SessionError::NotFound),
                };
                let _ = reply.send(result);
            }
            UserSessionMessage::Summarize(thread_id, model, reply) => {
                // The provider call runs off the mailbox; the result is stored back here.
                let (store, catalogue, user_id) =
                    (state.store.clone(), state.catalogue.clone(), state.user_id);
                let session = myself.clone();
                tokio::spawn(async move {
                    match compute_summary(store, catalogue, user_id, thread_id, model).await {
                        Ok((summary, true)) => {
                            let _ = session
                                .cast(UserSessionMessage::SummaryComputed(summary, Some(reply)));
                        }
                        Ok((summary, false)) => {
                            let _ = reply.send(Ok(summary));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                });
            }
            UserSessionMessage::TurnFinished {
                turn_id,
                thread_id,
                results,
            } => {
                crate::metrics::metrics().turn_finished(results.iter().map(|r| r.message.status));
                turn_finished(&myself, state, turn_id, thread_id, results).await;
            }
            UserSessionMessage::SummaryComputed(summary, reply) => {
                // The thread may have been deleted meanwhile; its summary must not come back.
                let result = match state
                    .store
                    .get_thread(state.user_id, summary.thread_id)
                    .await
                {
                    Ok(Some(_)) => state
                        .store
                        .upsert_summary(&summary)
                        .await
                        .map(|()| summary)
                        .map_err(SessionError::from),
                    Ok(None) => Err(SessionError::NotFound),
                    Err(e) => Err(e.into()),
                };
                match reply {
                    Some(reply) => {
                        let _ = reply.send(result);
                    }
                    None => {
                        if let Err(e) = result {
                            tracing::warn!(error = %e, "storing a background summary failed");
                        }
                    }
                }
            }
            UserSessionMessage::TitleGenerated(thread_id, provisional, title) => {
                if let Err(e) = set_title(state, thread_id, &provisional, title).await {
                    tracing::warn!(error = %e, %thread_id, "storing a generated title failed");
                }
            }
            UserSessionMessage::UploadLimit(reply) => {
                let result = current_user(state)
                    .await
                    .map(|user| state.quotas.tier(&user).1.upload_max_bytes);
                let _ = reply.send(result);
            }
            UserSessionMessage::CreateDocument(document, reply) => {
                let _ = reply.send(create_document(state, document).await);
            }
            UserSessionMessage::DeleteDocument(document_id, reply) => {
                let _ = reply.send(delete_document(state, document_id).await);
            }
            UserSessionMessage::DeleteProviderKey(provider, reply) => {
                state.ledger.lock().own_keys = None;
                let result = match state
                    .store
                    .delete_provider_key(state.user_id, &provider)
                    .await
                {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(SessionError::NotFound),
                    Err(e) => Err(e.into()),
                };
                let _ = reply.send(result);
            }
        }
        state.ledger.touch();
        Ok(())
    }
}

/// The hand-off check and flush of [`UserSessionMessage::Passivate`]; the caller stops the actor
/// on `Stopped`.
async fn passivate(state: &mut UserSessionState) -> Result<Passivation, SessionError> {
    {
        // Closed in the same lock as the check: no `/v1` request is admitted in between.
        let mut ledger = state.ledger.lock();
        let running = state.turns.len() + ledger.open.len();
        if running > 0 {
            return Ok(Passivation::Busy {
                running_turns: running,
            });
        }
        ledger.closed = true;
    }
    flush_usage(state).await;
    {
        let mut ledger = state.ledger.lock();
        if ledger.usage.has_pending() {
            // Stopping now would lose counters the store refused; the session stays and retries.
            ledger.closed = false;
            return Err(SessionError::Unavailable(
                "the user's usage could not be written; the session stays".into(),
            ));
        }
        ledger.flush_scheduled = false;
    }
    // Readers waiting for more see the logs end, and resume from wherever the user lives next.
    for (_, log) in state.logs.drain() {
        log.close();
    }
    Ok(Passivation::Stopped)
}

async fn create_thread(state: &UserSessionState, new: NewThread) -> Result<Thread, SessionError> {
    let now = Utc::now();
    let thread = Thread {
        user_id: state.user_id,
        id: Uuid::now_v7(),
        title: new.title,
        system_prompt: new.system_prompt,
        model: new.model,
        bookmarked: false,
        created_at: now,
        updated_at: now,
        message_count: 0,
    };
    state.store.create_thread(&thread).await?;
    Ok(thread)
}

async fn update_thread(
    state: &UserSessionState,
    thread_id: Uuid,
    patch: ThreadPatch,
) -> Result<Thread, SessionError> {
    let mut thread = state
        .store
        .get_thread(state.user_id, thread_id)
        .await?
        .ok_or(SessionError::NotFound)?;
    if let Some(title) = patch.title {
        thread.title = title;
    }
    if let Some(system_prompt) = patch.system_prompt {
        thread.system_prompt = system_prompt;
    }
    if let Some(model) = patch.model {
        thread.model = model;
    }
    if let Some(bookmarked) = patch.bookmarked {
        thread.bookmarked = bookmarked;
    }
    thread.updated_at = Utc::now();
    if !state.store.update_thread(&thread).await? {
        return Err(SessionError::NotFound);
    }
    Ok(thread)
}

async fn delete_thread(state: &UserSessionState, thread_id: Uuid) -> Result<(), SessionError> {
    if state.store.delete_thread(state.user_id, thread_id).await? {
        Ok(())
    } else {
        Err(SessionError::NotFound)
    }
}

async fn update_profile(
    state: &UserSessionState,
    patch: ProfilePatch,
) -> Result<User, SessionError> {
    let mut user = state
        .store
        .get_user(state.user_id)
        .await?
        .ok_or(SessionError::NotFound)?;
    if let Some(display_name) = patch.display_name {
        user.display_name = display_name;
    }
    if let Some(default_model) = patch.default_model {
        user.settings.default_model = default_model;
    }
    if let Some(temperature) = patch.temperature {
        user.settings.temperature = temperature;
    }
    if let Some(system_prompt) = patch.system_prompt {
        user.settings.system_prompt = system_prompt;
    }
    user.updated_at = Utc::now();
    if !state.store.update_user(&user).await? {
        return Err(SessionError::NotFound);
    }
    Ok(user)
}

async fn set_tier_role(
    state: &UserSessionState,
    change: TierRoleChange,
) -> Result<User, SessionError> {
    let mut user = state
        .store
        .get_user(state.user_id)
        .await?
        .ok_or(SessionError::NotFound)?;
    let tier_changed = change.tier.as_ref().is_some_and(|t| *t != user.tier);
    let role_changed = change.role.is_some_and(|r| r != user.role);
    if !tier_changed && !role_changed {
        return Ok(user);
    }
    if let Some(tier) = change.tier {
        user.tier = tier;
    }
    if let Some(role) = change.role {
        user.role = role;
    }
    user.updated_at = Utc::now();
    if !state.store.update_user(&user).await? {
        return Err(SessionError::NotFound);
    }
    tracing::info!(user_id = %user.id, tier = %user.tier, role = user.role.as_str(), "tier/role changed");
    Ok(user)
}

async fn create_api_key(
    state: &UserSessionState,
    key: ApiKey,
    max_keys: usize,
) -> Result<ApiKey, SessionError> {
    // Count and insert run inside this actor, so two concurrent creates cannot both pass the check.
    let held = state.store.list_api_keys(state.user_id).await?.len();
    if held >= max_keys {
        return Err(SessionError::Conflict(format!(
            "API key limit reached ({max_keys}); delete one first"
        )));
    }
    if key.user_id != state.user_id {
        return Err(SessionError::NotFound);
    }
    state.store.insert_api_key(&key).await?;
    Ok(key)
}

async fn delete_api_key(state: &UserSessionState, key_id: Uuid) -> Result<(), SessionError> {
    if state.store.delete_api_key(state.user_id, key_id).await? {
        Ok(())
    } else {
        Err(SessionError::NotFound)
    }
}

fn documents(state: &UserSessionState) -> Result<&Documents, SessionError> {
    state
        .documents
        .as_ref()
        .ok_or_else(|| SessionError::Unavailable("documents are not enabled on this node".into()))
}

async fn create_document(
    state: &mut UserSessionState,
    document: Document,
) -> Result<Document, SessionError> {
    if document.user_id != state.user_id {
        return Err(SessionError::NotFound);
    }
    let indexer = documents(state)?.indexer.clone();
    // The edge streamed against the limit it asked for; the tier may have changed since.
    let user = current_user(state).await?;
    let limit = state.quotas.tier(&user).1.upload_max_bytes;
    if u64::try_from(document.size).unwrap_or(u64::MAX) > limit {
        return Err(SessionError::TooLarge {
            what: "the file".into(),
            limit,
        });
    }
    state.store.create_document(&document).await?;
    indexer.enqueue(document.user_id, document.id);
    Ok(document)
}

async fn delete_document(state: &UserSessionState, document_id: Uuid) -> Result<(), SessionError> {
    let docs = documents(state)?;
    let Some(document) = state.store.get_document(state.user_id, document_id).await? else {
        return Err(SessionError::NotFound);
    };
    docs.indexer.cancel(state.user_id, document_id);
    if !state
        .store
        .delete_document(state.user_id, document_id)
        .await?
    {
        return Err(SessionError::NotFound);
    }
    // The row is gone, so the document is; a blob left behind by a failing blob store is only
    // storage (logged with its key for cleanup).
    if let Err(e) = docs.blobs.delete(&document.blob_key).await {
        tracing::error!(key = %document.blob_key, error = %e, "deleting a document's blob failed; it is orphaned");
    }
    Ok(())
}

/// How long a thread's events stay replayable after its last event (when nobody watches).
const LOG_RETENTION: Duration = Duration::from_secs(600);

/// How many models one message may ask for at once.
const MAX_MODELS_PER_TURN: usize = 4;

fn log_for(state: &mut UserSessionState, thread_id: Uuid) -> Arc<ThreadEvents> {
    state
        .logs
        .entry(thread_id)
        .or_insert_with(|| ThreadEvents::new(thread_id))
        .clone()
}

async fn subscribe(
    state: &mut UserSessionState,
    thread_id: Uuid,
) -> Result<Arc<ThreadEvents>, SessionError> {
    // Always ask the store: a log can outlive its thread for a moment, and ownership is the
    // store's to say.
    if state
        .store
        .get_thread(state.user_id, thread_id)
        .await?
        .is_none()
    {
        return Err(SessionError::NotFound);
    }
    Ok(log_for(state, thread_id))
}

/// The models a message goes to: the request's, else the thread's, else the user's default,
/// else the catalogue's first chat model.
fn resolve_models(
    state: &UserSessionState,
    requested: &[String],
    thread: &Thread,
    user: &User,
) -> Result<Vec<Model>, SessionError> {
    let mut ids: Vec<String> = requested.to_vec();
    if ids.is_empty() {
        let fallback = thread
            .model
            .clone()
            .or_else(|| user.settings.default_model.clone())
            .or_else(|| {
                state
                    .catalogue
                    .default_chat_model()
                    .map(|m| m.spec.id.clone())
            })
            .ok_or_else(|| SessionError::Invalid("no chat model is enabled".into()))?;
        ids.push(fallback);
    }
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(id.clone()));
    if ids.len() > MAX_MODELS_PER_TURN {
        return Err(SessionError::Invalid(format!(
            "at most {MAX_MODELS_PER_TURN} models per message"
        )));
    }
    ids.iter()
        .map(|id| {
            state
                .catalogue
                .get(id)
                .filter(|m| m.can("chat"))
                .cloned()
                .ok_or_else(|| {
                    SessionError::Invalid(format!(
                        "model `{id}` is unknown or not enabled on this server (see /api/v1/models)"
                    ))
                })
        })
        .collect()
}

/// The first words of a prompt, as a provisional title.
fn title_from_prompt(prompt: &str) -> String {
    const WORDS: usize = 8;
    let words: Vec<&str> = prompt.split_whitespace().collect();
    let mut title = words
        .iter()
        .take(WORDS)
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    if title.chars().count() > 80 {
        title = title.chars().take(80).collect();
    }
    if words.len() > WORDS {
        title.push('…');
    }
    title
}

/// A message of this turn with defaults; callers set role, model, content, status, parent.
fn new_message(state: &UserSessionState, thread_id: Uuid, turn_id: Uuid) -> Message {
    Message {
        user_id: state.user_id,
        thread_id,
        id: Uuid::now_v7(),
        role: MessageRole::User,
        model: None,
        content: String::new(),
        status: MessageStatus::Complete,
        usage: Usage::default(),
        cost_usd: 0.0,
        latency_ms: None,
        ttft_ms: None,
        provider: None,
        deployment: None,
        citations: Vec::new(),
        parent_id: None,
        turn_id: Some(turn_id),
        created_at: Utc::now(),
    }
}

async fn start_turn(
    myself: &ActorRef<UserSessionMessage>,
    state: &mut UserSessionState,
    thread_id: Uuid,
    send: SendMessage,
) -> Result<TurnStarted, SessionError> {
    let mut placeholders = Vec::new();
    let mut reservation = None;
    let started = launch_turn(
        myself,
        state,
        thread_id,
        send,
        &mut placeholders,
        &mut reservation,
    )
    .await;
    if let Some(reservation) = reservation {
        // Admitted, then not started: the request does not count.
        state.ledger.refund(reservation);
    }
    if let Err(error) = &started {
        // Assistant rows already stored must not stay `streaming` with no turn behind them.
        for mut message in placeholders {
            message.status = MessageStatus::Failed;
            if let Err(e) = state.store.update_message(&message).await {
                tracing::error!(error = %e, message_id = %message.id, "settling a placeholder failed");
            }
        }
        tracing::warn!(%error, %thread_id, "starting a turn failed");
    }
    started
}

async fn launch_turn(
    myself: &ActorRef<UserSessionMessage>,
    state: &mut UserSessionState,
    thread_id: Uuid,
    send: SendMessage,
    placeholders: &mut Vec<Message>,
    reservation: &mut Option<Reservation>,
) -> Result<TurnStarted, SessionError> {
    let store = state.store.clone();
    let mut thread = store
        .get_thread(state.user_id, thread_id)
        .await?
        .ok_or(SessionError::NotFound)?;
    let user = current_user(state).await?;
    let models = resolve_models(state, &send.models, &thread, &user)?;
    // Limits before anything is stored: a refused message changes nothing.
    for model in &models {
        state
            .quotas
            .check_model(&user, &model.spec.id, &model.spec.tiers)?;
    }
    // Documents attached to the message: checked, then sent whole when they fit half of the
    // smallest window, else the best passages retrieved — all before anything is stored.
    let mut sources: Option<(Vec<Passage>, &'static str, String)> = None;
    if !send.document_ids.is_empty() {
        let (_, tier) = state.quotas.tier(&user);
        let most = tier.files_per_request as usize;
        if send.document_ids.len() > most {
            return Err(SessionError::Invalid(format!(
                "at most {most} documents per message on your plan"
            )));
        }
        let period = admit_rag(state, &user).await?;
        let retrieval = state.retrieval.get_or_insert_with(Retrieval::default);
        let ready = retrieval.refresh(&*store, state.user_id).await?;
        check_documents(&*store, state.user_id, &ready, &send.document_ids).await?;
        let budget = models
            .iter()
            .map(|m| m.spec.context_length as usize)
            .min()
            .unwrap_or(0)
            / 2;
        let whole: Vec<Passage> = send
            .document_ids
            .iter()
            .flat_map(|id| retrieval.document_passages(*id))
            .collect();
        let whole_tokens: usize = whole.iter().map(|p| p.text.len().div_ceil(4)).sum();
        let (passages, mode) = if whole_tokens <= budget {
            (whole, "whole")
        } else {
            let found = retrieval.search(
                &send.content,
                send.query_embedding.as_deref(),
                Some(&send.document_ids),
                RAG_TOP_K,
            );
            (found.results, "retrieval")
        };
        sources = Some((passages, mode, period));
    }
    let source_tokens: u64 = sources.as_ref().map_or(0, |(passages, _, _)| {
        passages
            .iter()
            .map(|p| p.text.len().div_ceil(4) as u64)
            .sum()
    });
    let estimate = models
        .iter()
        .map(|m| {
            count_tokens(m, &send.content) as u64
                + source_tokens
                + u64::from(leg_max_tokens(&send, m))
        })
        .sum();
    *reservation = Some(admit(state, &user, Holder::Turn, estimate).await?);
    let turn_id = Uuid::now_v7();

    // Nothing accepted is lost: the user's message is stored before any provider is called.
    let user_message = Message {
        model: (models.len() == 1).then(|| models[0].spec.id.clone()),
        content: send.content.clone(),
        ..new_message(state, thread_id, turn_id)
    };
    store.append_message(&user_message).await?;

    let mut title_from = None;
    if thread.title.is_none() {
        thread.title = Some(title_from_prompt(&send.content));
        thread.updated_at = Utc::now();
        store.update_thread(&thread).await?;
        if !models[0].is_mock() {
            title_from = Some((send.content.clone(), models[0].clone()));
        }
    }

    let mut history = store
        .list_messages(
            state.user_id,
            thread_id,
            &MessageQuery {
                limit: 200,
                cursor: None,
                order: Order::Desc,
                model: None,
            },
        )
        .await?
        .items;
    history.reverse();
    let system_prompt = thread
        .system_prompt
        .clone()
        .or_else(|| user.settings.system_prompt.clone());
    let (system_prompt, citations) = match &sources {
        Some((passages, _, _)) if !passages.is_empty() => (
            Some(with_sources(system_prompt.as_deref(), passages)),
            passages
                .iter()
                .map(|p| Citation {
                    document_id: p.document_id,
                    document_name: p.document_name.clone(),
                    chunk: p.chunk,
                    position: p.position.clone(),
                    text: p.text.clone(),
                })
                .collect(),
        ),
        _ => (system_prompt, Vec::new()),
    };
    let temperature = send.temperature.or(user.settings.temperature);

    let mut legs = Vec::with_capacity(models.len());
    let mut assistant_messages = Vec::with_capacity(models.len());
    let mut summarize = Vec::new();
    for model in models {
        let summary = store
            .get_summary(state.user_id, thread_id, &model.spec.id)
            .await?;
        let max_tokens = leg_max_tokens(&send, &model);
        let (request, stats) = context::assemble(
            &model,
            system_prompt.as_deref(),
            summary.as_ref(),
            &history,
            max_tokens,
            temperature,
        );
        if stats.messages_dropped > 0 {
            summarize.push(model.spec.id.clone());
        }
        let message = Message {
            role: MessageRole::Assistant,
            model: Some(model.spec.id.clone()),
            status: MessageStatus::Streaming,
            parent_id: Some(user_message.id),
            citations: citations.clone(),
            ..new_message(state, thread_id, turn_id)
        };
        store.append_message(&message).await?;
        placeholders.push(message.clone());
        assistant_messages.push(message.clone());
        // Prompt-cache affinity: the deployment that answered this model here last.
        let affinity = history
            .iter()
            .rev()
            .find(|m| {
                m.role == MessageRole::Assistant && m.model.as_deref() == Some(&model.spec.id)
            })
            .and_then(|m| m.deployment.clone());
        legs.push(TurnLeg {
            model,
            message,
            request,
            estimated_input_tokens: stats.estimated_tokens as u64,
            affinity,
        });
    }

    // The real prompts are known now; a longer history than estimated takes the difference.
    let assembled: u64 = legs
        .iter()
        .map(|l| l.estimated_input_tokens + u64::from(l.request.max_tokens.unwrap_or(0)))
        .sum();
    if let Some(reservation) = reservation.as_mut() {
        state.ledger.top_up(reservation, assembled);
    }
    let period = reservation
        .as_ref()
        .map(|r| r.period.clone())
        .unwrap_or_else(usage_period);

    let log = log_for(state, thread_id);
    let from_seq = log.next_seq();
    if let Some((passages, mode, period)) = &sources {
        let documents = send.document_ids.len();
        let message = match *mode {
            "whole" => format!(
                "sending {documents} document(s) whole ({} passages)",
                passages.len()
            ),
            _ => format!(
                "retrieved {} passages from {documents} document(s)",
                passages.len()
            ),
        };
        log.append(
            turn_id,
            "status",
            &json!({ "stage": "retrieval", "mode": mode, "message": message, "passages": passages.len() }),
        );
        state.ledger.lock().usage.add(period, "rag_queries", 1);
        schedule_usage_flush(myself, state);
    }
    let (cancel, cancel_rx) = watch::channel(false);
    let (first_tx, first_rx) = oneshot::channel();
    let message_ids = assistant_messages.iter().map(|m| m.id).collect();
    let args = TurnArgs {
        turn_id,
        thread_id,
        user_message_id: user_message.id,
        legs,
        log: log.clone(),
        store,
        cancel: cancel_rx,
        session: myself.clone(),
        first_outcome: Some(first_tx),
        timeouts: state.turn_timeouts,
        catalogue: state.catalogue.clone(),
        own_keys: own_keys(state).await,
        usage_period: period,
    };
    let (turn, _) = Actor::spawn_linked(None, Turn, args, myself.get_cell())
        .await
        .map_err(|e| SessionError::Unavailable(format!("starting the turn: {e}")))?;
    let reservation = reservation
        .take()
        .ok_or_else(|| SessionError::Unavailable("turn admitted without a reservation".into()))?;
    let rate_limit = reservation.admission;
    state.turns.insert(
        turn_id,
        LiveTurn {
            thread_id,
            cancel,
            actor: turn.get_id(),
            message_ids,
            summarize,
            title_from,
            reservation,
            _running: state.turn_counter.enter(),
        },
    );
    Ok(TurnStarted {
        turn_id,
        user_message,
        assistant_messages,
        log,
        from_seq,
        first_outcome: first_rx,
        rate_limit,
    })
}

/// The user's own provider keys, opened (once per session, or after they change).
async fn own_keys(state: &mut UserSessionState) -> HashMap<String, String> {
    let Some(opener) = state.key_opener.clone() else {
        // Known to be none (the fast lane needs to know that too, after a key changed).
        state.ledger.lock().own_keys = Some(HashMap::new());
        return HashMap::new();
    };
    if let Some(keys) = &state.ledger.lock().own_keys {
        return keys.clone();
    }
    let keys: HashMap<String, String> = match state.store.list_provider_keys(state.user_id).await {
        Ok(sealed) => sealed
            .iter()
            .filter_map(|k| {
                opener
                    .open(state.user_id, &k.provider, &k.sealed)
                    .map(|plain| (k.provider.clone(), plain))
            })
            .collect(),
        Err(e) => {
            // Shared deployments still serve the user; the keys are read again next turn.
            tracing::warn!(error = %e, "reading the user's provider keys failed");
            return HashMap::new();
        }
    };
    state.ledger.lock().own_keys = Some(keys.clone());
    keys
}

/// The most output tokens one leg may ask for: the request's, within the model's maximum.
fn leg_max_tokens(send: &SendMessage, model: &Model) -> u32 {
    send.max_tokens
        .unwrap_or(model.spec.max_output_tokens)
        .min(model.spec.max_output_tokens.max(1))
}

/// `Search`: the user's index brought up to date, the documents checked, one RAG query counted.
async fn search(
    myself: &ActorRef<UserSessionMessage>,
    state: &mut UserSessionState,
    query: SearchQuery,
) -> Result<SearchResults, SessionError> {
    let user = current_user(state).await?;
    let period = admit_rag(state, &user).await?;
    let retrieval = state.retrieval.get_or_insert_with(Retrieval::default);
    let ready = retrieval.refresh(&*state.store, state.user_id).await?;
    if let Some(ids) = &query.document_ids {
        check_documents(&*state.store, state.user_id, &ready, ids).await?;
    }
    let results = retrieval.search(
        &query.query,
        query.embedding.as_deref(),
        query.document_ids.as_deref(),
        query.top_k,
    );
    state.ledger.lock().usage.add(&period, "rag_queries", 1);
    schedule_usage_flush(myself, state);
    Ok(results)
}

/// Each of `ids` must be one of the user's `ready` documents: another user's (or a missing) one
/// is a 404 like any other resource, one still being ingested (or failed) a 400 saying so.
async fn check_documents(
    store: &dyn Store,
    user_id: Uuid,
    ready: &[Uuid],
    ids: &[Uuid],
) -> Result<(), SessionError> {
    for id in ids {
        if ready.contains(id) {
            continue;
        }
        return match store.get_document(user_id, *id).await? {
            None => Err(SessionError::DocumentNotFound),
            Some(document) => Err(SessionError::Invalid(format!(
                "document {id} is {} and cannot be used yet",
                document.status.as_str()
            ))),
        };
    }
    Ok(())
}

/// Passages retrieved for a message when its documents do not fit the context whole.
const RAG_TOP_K: usize = 5;

/// The system prompt with the numbered sources the model is asked to cite.
fn with_sources(system_prompt: Option<&str>, passages: &[Passage]) -> String {
    let mut prompt = String::new();
    if let Some(base) = system_prompt {
        prompt.push_str(base);
        prompt.push_str("\n\n");
    }
    prompt.push_str(
        "Answer from the numbered sources below when they are relevant, and cite them like [1]. \
         If they do not contain the answer, say so.\n",
    );
    for (n, passage) in passages.iter().enumerate() {
        let mut place = passage.document_name.clone();
        for heading in &passage.position.heading_path {
            place.push_str(" › ");
            place.push_str(heading);
        }
        if let Some(page) = passage.position.page {
            place.push_str(&format!(" (page {page})"));
        }
        prompt.push_str(&format!("\n[{}] {place}:\n{}\n", n + 1, passage.text));
    }
    prompt
}

/// Writes pending usage about a second from now (one write for many requests).
fn schedule_usage_flush(myself: &ActorRef<UserSessionMessage>, state: &UserSessionState) {
    let due = {
        let mut ledger = state.ledger.lock();
        let due = ledger.usage.has_pending() && !ledger.flush_scheduled;
        ledger.flush_scheduled |= due;
        due
    };
    if due {
        myself.send_after(USAGE_FLUSH_AFTER, || UserSessionMessage::FlushUsage(None));
    }
}

/// Writes the pending usage counters; what the store refuses stays pending for the next try.
async fn flush_usage(state: &UserSessionState) {
    let pending = state.ledger.lock().usage.take_pending();
    if pending.is_empty() {
        return;
    }
    let failed = write_usage(&*state.store, state.user_id, pending).await;
    if !failed.is_empty() {
        state.ledger.lock().usage.restore(failed);
    }
}

/// The user row, from the session's copy (read once; changes come through this session).
async fn current_user(state: &mut UserSessionState) -> Result<User, SessionError> {
    if let Some(user) = &state.ledger.lock().user {
        return Ok(user.clone());
    }
    let user = state
        .store
        .get_user(state.user_id)
        .await?
        .ok_or(SessionError::NotFound)?;
    state.ledger.lock().user = Some(user.clone());
    Ok(user)
}

/// Loads the month's usage counters into the ledger when the user's tier needs them (`rag`:
/// for a retrieval). Only the session loads them, one message at a time, so a load never races
/// a flush; requests settled meanwhile are pending and `install` counts them.
async fn load_counters(
    state: &UserSessionState,
    user: &User,
    rag: bool,
) -> Result<(), SessionError> {
    if !state.quotas.needs_counters(user, rag) {
        return Ok(());
    }
    let period = crate::quota::period_of(state.quotas.clock.now());
    if state.ledger.lock().usage.loaded(&period).is_some() {
        return Ok(());
    }
    let stored = state.store.get_usage(state.user_id, &period).await?;
    state.ledger.lock().usage.install(&period, stored);
    Ok(())
}

/// Admits a turn or a request of `user` (loaded by the caller) against the tier's limits.
async fn admit(
    state: &UserSessionState,
    user: &User,
    holder: Holder,
    estimate: u64,
) -> Result<Reservation, SessionError> {
    load_counters(state, user, false).await?;
    state
        .ledger
        .admit(holder, estimate)
        .unwrap_or_else(|| Err(SessionError::Unavailable("the user is not loaded".into())))
}

/// Checks the monthly RAG limit; the period to count the query in.
async fn admit_rag(state: &UserSessionState, user: &User) -> Result<String, SessionError> {
    load_counters(state, user, true).await?;
    let now = state.quotas.clock.now();
    state
        .quotas
        .admit_rag(now, &state.ledger.lock().usage, user)
}

/// `Admit`: one request to a model outside a thread.
async fn admit_request(
    state: &mut UserSessionState,
    model_id: &str,
    estimate: u64,
) -> Result<Reservation, SessionError> {
    let user = current_user(state).await?;
    let catalogue = state.catalogue.clone();
    let model = catalogue.get(model_id).ok_or_else(|| {
        SessionError::Invalid(format!("model `{model_id}` is unknown or not enabled"))
    })?;
    // Loads what the edge's fast lane needs, then admits the way it does: the next request
    // of this user is admitted there, without a message.
    own_keys(state).await;
    load_counters(state, &user, false).await?;
    state
        .ledger
        .admit_request_now(&model.spec.id, &model.spec.tiers, estimate)
        .unwrap_or_else(|| Err(SessionError::Unavailable("the session is stopping".into())))
}

/// How long `/v1` usage waits in the session before it is written (in one batch).
pub(crate) const USAGE_FLUSH_AFTER: Duration = Duration::from_secs(1);

/// The calendar month in UTC (`YYYY-MM`): the period of monthly usage counters.
pub fn usage_period() -> String {
    Utc::now().format("%Y-%m").to_string()
}

async fn turn_finished(
    myself: &ActorRef<UserSessionMessage>,
    state: &mut UserSessionState,
    turn_id: Uuid,
    thread_id: Uuid,
    results: Vec<LegResult>,
) {
    let Some(turn) = state.turns.remove(&turn_id) else {
        return;
    };
    // Settled once, with the real counts (a leg refused before output reports none).
    let used: u64 = results
        .iter()
        .map(|r| (r.message.usage.input_tokens + r.message.usage.output_tokens).max(0) as u64)
        .sum();
    // The turn wrote its usage to the store (turn.rs); the book counts it from now on.
    {
        let mut ledger = state.ledger.lock();
        for (kind, delta) in turn_usage(&results).into_iter().flatten() {
            ledger.usage.observe(&turn.reservation.period, kind, delta);
        }
    }
    state.ledger.settle(turn.reservation, used);
    if let Some((prompt, model)) = turn.title_from {
        let answered = results
            .iter()
            .any(|r| r.message.status == MessageStatus::Complete);
        if answered {
            spawn_title_generation(
                myself.clone(),
                state.catalogue.clone(),
                thread_id,
                prompt,
                model,
            );
        }
    }
    // Summaries due after this turn are computed off the mailbox (a provider call can take
    // seconds); the result comes back as a message and is stored here.
    for model in turn.summarize {
        let (store, catalogue, user_id) =
            (state.store.clone(), state.catalogue.clone(), state.user_id);
        let session = myself.clone();
        tokio::spawn(async move {
            match compute_summary(store, catalogue, user_id, thread_id, Some(model.clone())).await {
                Ok((summary, true)) => {
                    let _ = session.cast(UserSessionMessage::SummaryComputed(summary, None));
                }
                Ok((_, false)) => {}
                Err(e) => {
                    tracing::warn!(error = %e, %thread_id, model, "background summary failed")
                }
            }
        });
    }
}

/// Routing for background calls (titles, summaries): the pools' choice and failover, no
/// affinity, the default first-token deadline, the shared keys.
fn background_route() -> RouteOptions {
    RouteOptions {
        first_token_timeout: TurnTimeouts::default().first_token,
        ..RouteOptions::default()
    }
}

/// Asks the model for a short title off the session's mailbox; the answer comes back as a
/// message so the write is still serialized here.
fn spawn_title_generation(
    session: ActorRef<UserSessionMessage>,
    catalogue: Arc<Catalogue>,
    thread_id: Uuid,
    prompt: String,
    model: Model,
) {
    let provisional = title_from_prompt(&prompt);
    tokio::spawn(async move {
        let request = ChatRequest {
            model: model.spec.upstream.clone(),
            system: Some(
                "Write a title of at most six words for a conversation that starts with the \
                 user's message below. Answer with the title only, no quotes."
                    .into(),
            ),
            messages: vec![ChatMessage {
                role: ChatRole::User,
                content: prompt.chars().take(2000).collect(),
            }],
            max_tokens: Some(20),
            temperature: Some(0.2),
        };
        let routed = routing::complete(
            &catalogue,
            &model,
            &request,
            &background_route(),
            &mut |_| {},
        )
        .await;
        match routed.map(|r| r.value) {
            Ok(done) => {
                let title = done.text.trim().trim_matches('"').trim().to_owned();
                if !title.is_empty() {
                    let title: String = title.chars().take(80).collect();
                    let _ = session.cast(UserSessionMessage::TitleGenerated(
                        thread_id,
                        provisional,
                        title,
                    ));
                }
            }
            Err(e) => tracing::warn!(error = %e, %thread_id, "title generation failed"),
        }
    });
}

/// Replaces the provisional title, unless the user renamed the thread meanwhile.
async fn set_title(
    state: &UserSessionState,
    thread_id: Uuid,
    provisional: &str,
    title: String,
) -> Result<(), SessionError> {
    if let Some(mut thread) = state.store.get_thread(state.user_id, thread_id).await?
        && thread.title.as_deref() == Some(provisional)
    {
        thread.title = Some(title);
        state.store.update_thread(&thread).await?;
    }
    Ok(())
}

/// Messages of a model's conversation that stay verbatim; older ones are folded.
const KEEP_RECENT: usize = 6;

/// Folds a model's older conversation into its summary: reads and the provider call only, so it
/// can run off the session's mailbox. Returns the summary and whether it is new (to be stored).
async fn compute_summary(
    store: Arc<dyn Store>,
    catalogue: Arc<Catalogue>,
    user_id: Uuid,
    thread_id: Uuid,
    model_id: Option<String>,
) -> Result<(Summary, bool), SessionError> {
    let thread = store
        .get_thread(user_id, thread_id)
        .await?
        .ok_or(SessionError::NotFound)?;
    let model_id = match model_id.or(thread.model.clone()) {
        Some(id) => id,
        None => catalogue
            .default_chat_model()
            .map(|m| m.spec.id.clone())
            .ok_or_else(|| SessionError::Invalid("no chat model is enabled".into()))?,
    };
    let model = catalogue.get(&model_id).cloned().ok_or_else(|| {
        SessionError::Invalid(format!("model `{model_id}` is unknown or not enabled"))
    })?;
    let previous = store.get_summary(user_id, thread_id, &model_id).await?;
    let mut history = store
        .list_messages(
            user_id,
            thread_id,
            &MessageQuery {
                limit: 100,
                cursor: None,
                order: Order::Desc,
                model: None,
            },
        )
        .await?
        .items;
    history.reverse();
    let conversation: Vec<&Message> = history
        .iter()
        .filter(|m| {
            !m.content.is_empty()
                && (m.role == MessageRole::User || m.model.as_deref() == Some(model_id.as_str()))
                && previous.as_ref().is_none_or(|p| m.id > p.covers_until)
        })
        .collect();
    let fold = conversation.len().saturating_sub(KEEP_RECENT);
    let Some(last_folded) = conversation.get(fold.wrapping_sub(1)).filter(|_| fold > 0) else {
        // Nothing new to fold: the current summary (or an empty one) stands.
        let unchanged = previous.unwrap_or(Summary {
            user_id,
            thread_id,
            model: model_id,
            text: String::new(),
            covers_until: Uuid::nil(),
            updated_at: Utc::now(),
        });
        return Ok((unchanged, false));
    };
    let folded = &conversation[..fold];
    let text = if model.is_mock() {
        // Mock models cannot summarize; a deterministic digest keeps the feature testable.
        mock_digest(previous.as_ref().map(|p| p.text.as_str()), folded)
    } else {
        let mut transcript = String::new();
        if let Some(p) = &previous {
            transcript.push_str(&format!("Earlier summary: {}\n\n", p.text));
        }
        for m in folded {
            let who = if m.role == MessageRole::User {
                "User"
            } else {
                "Assistant"
            };
            transcript.push_str(&format!("{who}: {}\n", m.content));
        }
        let budget = model.spec.context_length as usize / 2;
        while count_tokens(&model, &transcript) > budget && transcript.len() > 1000 {
            let cut = transcript.len() / 4;
            let cut = (cut..transcript.len())
                .find(|i| transcript.is_char_boundary(*i))
                .unwrap_or(0);
            transcript.drain(..cut);
        }
        let request = ChatRequest {
            model: model.spec.upstream.clone(),
            system: Some(
                "Summarize the conversation below in a few sentences, keeping names, facts, \
                 decisions and open questions. Answer with the summary only."
                    .into(),
            ),
            messages: vec![ChatMessage {
                role: ChatRole::User,
                content: transcript,
            }],
            max_tokens: Some(400),
            temperature: Some(0.2),
        };
        routing::complete(
            &catalogue,
            &model,
            &request,
            &background_route(),
            &mut |_| {},
        )
        .await
        .map_err(SessionError::Provider)?
        .value
        .text
    };
    let summary = Summary {
        user_id,
        thread_id,
        model: model_id,
        text,
        covers_until: last_folded.id,
        updated_at: Utc::now(),
    };
    Ok((summary, true))
}

fn mock_digest(previous: Option<&str>, folded: &[&Message]) -> String {
    let mut parts: Vec<String> = previous
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .into_iter()
        .collect();
    for m in folded {
        let who = if m.role == MessageRole::User {
            "user"
        } else {
            "assistant"
        };
        let words: Vec<&str> = m.content.split_whitespace().take(8).collect();
        parts.push(format!("{who}: {}", words.join(" ")));
    }
    parts.join("; ")
}

/// Settles the messages of a turn that ended without settling them itself (it crashed, or the
/// session stopped): what was stored stays, the status becomes `failed`, and readers get the
/// `error`, `message_complete` and `done` events they wait for.
async fn settle_abandoned(state: &UserSessionState, turn_id: Uuid, turn: LiveTurn, reason: &str) {
    let log = state.logs.get(&turn.thread_id).cloned();
    // The rate bucket is settled with the stored counts when every leg settled itself; a leg
    // cut off unsettled (or unreadable) keeps the whole reservation as its charge.
    let mut used = Some(0u64);
    for &message_id in &turn.message_ids {
        let Ok(Some(mut message)) = state
            .store
            .get_message(state.user_id, turn.thread_id, message_id)
            .await
        else {
            used = None;
            continue;
        };
        if message.status != MessageStatus::Streaming {
            used = used.map(|u| {
                u + (message.usage.input_tokens + message.usage.output_tokens).max(0) as u64
            });
            continue;
        }
        used = None;
        message.status = MessageStatus::Failed;
        if let Err(e) = state.store.update_message(&message).await {
            tracing::error!(error = %e, %message_id, "settling an abandoned message failed");
        }
        if let Some(log) = &log {
            log.append(
                turn_id,
                "error",
                &json!({ "message_id": message_id, "code": "internal", "message": reason, "retryable": true }),
            );
            log.append(
                turn_id,
                "message_complete",
                &json!({ "message_id": message_id, "status": "failed" }),
            );
        }
    }
    if let Some(log) = &log
        && !log.has_done(turn_id)
    {
        log.append(turn_id, "done", &json!({ "turn_id": turn_id }));
    }
    let used = used.unwrap_or(turn.reservation.tokens);
    state.ledger.settle(turn.reservation, used);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provisional_titles_are_the_first_words() {
        assert_eq!(title_from_prompt("  hello   there "), "hello there");
        assert_eq!(
            title_from_prompt("one two three four five six seven eight nine ten"),
            "one two three four five six seven eight…"
        );
    }
}
