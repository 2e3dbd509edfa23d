//! `UserSession`: the home of one user's state on this node.
//!
//! Every change to the user's threads and profile is a message here, handled one at a time, so
//! two concurrent requests of the same user never interleave their read-modify-write. The actor
//! keeps no copy of stored data yet (later: quotas, live turns, the thread-search index); it stops
//! itself after `idle_timeout` without messages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;
use uuid::Uuid;

use super::{NewThread, ProfilePatch, SessionError, ThreadPatch};
use crate::store::{ApiKey, ProviderKey, Store, Thread, User};

pub struct UserSession;

pub struct UserSessionArgs {
    pub user_id: Uuid,
    pub store: Arc<dyn Store>,
    pub idle_timeout: Duration,
}

pub struct UserSessionState {
    user_id: Uuid,
    store: Arc<dyn Store>,
    idle_timeout: Duration,
    last_active: Instant,
    idle_timer: Option<JoinHandle<()>>,
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
    /// A key (hashed by the edge) and the most keys the user may hold.
    CreateApiKey(ApiKey, usize, RpcReplyPort<Result<ApiKey, SessionError>>),
    DeleteApiKey(Uuid, RpcReplyPort<Result<(), SessionError>>),
    PutProviderKey(ProviderKey, RpcReplyPort<Result<(), SessionError>>),
    DeleteProviderKey(String, RpcReplyPort<Result<(), SessionError>>),
    /// Periodic self-check: stop when idle for `idle_timeout`.
    IdleCheck,
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
            idle_timeout: args.idle_timeout,
            last_active: Instant::now(),
            idle_timer: Some(idle_timer),
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(timer) = state.idle_timer.take() {
            timer.abort();
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
                if state.last_active.elapsed() >= state.idle_timeout {
                    tracing::debug!(user_id = %state.user_id, "passivating idle user session");
                    myself.stop(Some("idle".into()));
                }
                return Ok(());
            }
            UserSessionMessage::CreateThread(new, reply) => {
                let _ = reply.send(create_thread(state, new).await);
            }
            UserSessionMessage::UpdateThread(thread_id, patch, reply) => {
                let _ = reply.send(update_thread(state, thread_id, patch).await);
            }
            UserSessionMessage::DeleteThread(thread_id, reply) => {
                let _ = reply.send(delete_thread(state, thread_id).await);
            }
            UserSessionMessage::UpdateProfile(patch, reply) => {
                let _ = reply.send(update_profile(state, patch).await);
            }
            UserSessionMessage::CreateApiKey(key, max_keys, reply) => {
                let _ = reply.send(create_api_key(state, key, max_keys).await);
            }
            UserSessionMessage::DeleteApiKey(key_id, reply) => {
                let _ = reply.send(delete_api_key(state, key_id).await);
            }
            UserSessionMessage::PutProviderKey(key, reply) => {
                let result = if key.user_id == state.user_id {
                    state.store.put_provider_key(&key).await.map_err(Into::into)
                } else {
                    Err(SessionError::NotFound)
                };
                let _ = reply.send(result);
            }
            UserSessionMessage::DeleteProviderKey(provider, reply) => {
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
        state.last_active = Instant::now();
        Ok(())
    }
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
