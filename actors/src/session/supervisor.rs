//! `SessionSupervisor`: spawns `UserSession`s on demand and forgets them when they stop.

use std::collections::HashMap;
use std::sync::Arc;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::RactorMessage;
use uuid::Uuid;

use super::ledger::Ledger;
use super::user_session::{UserSession, UserSessionArgs, UserSessionMessage};
use super::{LiveSession, LiveSessions, SessionConfig};
use crate::provider::catalogue::Catalogue;
use crate::store::Store;

pub struct SessionSupervisor;

pub struct SessionSupervisorArgs {
    pub store: Arc<dyn Store>,
    pub catalogue: Arc<Catalogue>,
    pub config: SessionConfig,
    pub live: LiveSessions,
}

pub struct SessionSupervisorState {
    store: Arc<dyn Store>,
    catalogue: Arc<Catalogue>,
    config: SessionConfig,
    live: LiveSessions,
    /// Reverse index so a supervision event (which names an actor) finds its user.
    users_by_actor: HashMap<ActorId, Uuid>,
}

#[derive(RactorMessage)]
pub enum SessionSupervisorMessage {
    /// The running session of a user, spawning it when there is none.
    GetOrSpawn(
        Uuid,
        RpcReplyPort<Result<ActorRef<UserSessionMessage>, String>>,
    ),
}

impl Actor for SessionSupervisor {
    type Msg = SessionSupervisorMessage;
    type State = SessionSupervisorState;
    type Arguments = SessionSupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SessionSupervisorState {
            store: args.store,
            catalogue: args.catalogue,
            config: args.config,
            live: args.live,
            users_by_actor: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SessionSupervisorMessage::GetOrSpawn(user_id, reply) => {
                let result = get_or_spawn(&myself, state, user_id).await;
                // The caller may have timed out and gone; nothing to do then.
                let _ = reply.send(result);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A session that stopped (idle) or failed is forgotten; the next request rebuilds it from
        // the store. Failures are not fatal to the supervisor: one user's bug must not stop others.
        let (cell, failure) = match &event {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            _ => return Ok(()),
        };
        let actor_id = cell.get_id();
        if let Some(user_id) = state.users_by_actor.remove(&actor_id) {
            if let Some(reason) = failure {
                tracing::warn!(%user_id, %reason, "user session failed; it restarts from the store on next use");
            }
            if let Ok(mut live) = state.live.write()
                && live.get(&user_id).map(|s| s.actor.get_id()) == Some(actor_id)
            {
                live.remove(&user_id);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        myself.stop_children_and_wait(None, None).await;
        if let Ok(mut live) = state.live.write() {
            live.clear();
        }
        Ok(())
    }
}

async fn get_or_spawn(
    myself: &ActorRef<SessionSupervisorMessage>,
    state: &mut SessionSupervisorState,
    user_id: Uuid,
) -> Result<ActorRef<UserSessionMessage>, String> {
    let existing = state
        .live
        .read()
        .ok()
        .and_then(|m| m.get(&user_id).map(|live| live.actor.clone()));
    if let Some(session) = existing
        && super::is_alive(&session)
    {
        return Ok(session);
    }
    let quotas = super::quota::Quotas {
        tiers: state.config.tiers.clone(),
        clock: state.config.clock.clone(),
        buckets: state.config.user_buckets.clone(),
    };
    let ledger = Arc::new(Ledger::new(quotas, state.config.key_opener.is_some()));
    let args = UserSessionArgs {
        user_id,
        store: state.store.clone(),
        catalogue: state.catalogue.clone(),
        idle_timeout: state.config.idle_timeout,
        turn_timeouts: state.config.turn_timeouts,
        key_opener: state.config.key_opener.clone(),
        documents: state.config.documents.clone(),
        ledger: ledger.clone(),
        turn_counter: state.config.turn_counter.clone(),
    };
    // Unnamed: ractor's name registry is process-global, and sessions are many and short-lived.
    let (session, _handle) = Actor::spawn_linked(None, UserSession, args, myself.get_cell())
        .await
        .map_err(|e| format!("spawning user session: {e}"))?;
    state.users_by_actor.insert(session.get_id(), user_id);
    state
        .live
        .write()
        .map_err(|_| "session map poisoned".to_string())?
        .insert(
            user_id,
            LiveSession {
                actor: session.clone(),
                ledger,
            },
        );
    Ok(session)
}
