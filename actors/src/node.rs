//! `NodeSupervisor`: the root of this node's actor tree.
//!
//! It owns the `SessionSupervisor` and restarts it if it fails; the [`Sessions`] handle given to
//! the edge follows the restart through a shared slot. Later issues hang the provider, indexer and
//! cluster supervisors here.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::provider::catalogue::Catalogue;
use crate::provider::pool::PoolState;
use crate::provider::pool::actor::{ProviderPool, ProviderPoolArgs};
use crate::session::{
    LiveSessions, SessionConfig, SessionSupervisor, SessionSupervisorArgs,
    SessionSupervisorMessage, Sessions,
};
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("starting the node supervisor: {0}")]
    Spawn(String),
}

/// A running node runtime: the supervisor tree and the handles the edge uses.
pub struct Node {
    supervisor: ActorRef<NodeMessage>,
    handle: JoinHandle<()>,
    pub sessions: Sessions,
}

impl Node {
    pub async fn start(
        store: Arc<dyn Store>,
        catalogue: Arc<Catalogue>,
        sessions: SessionConfig,
    ) -> Result<Node, NodeError> {
        let slot: SupervisorSlot = Arc::new(RwLock::new(None));
        let live: LiveSessions = Arc::new(RwLock::new(HashMap::new()));
        let args = NodeArgs {
            store,
            catalogue,
            sessions: sessions.clone(),
            slot: slot.clone(),
            live: live.clone(),
            pool_actors: Vec::new(),
        };
        let (supervisor, handle) = Actor::spawn(None, NodeSupervisor, args)
            .await
            .map_err(|e| NodeError::Spawn(e.to_string()))?;
        let handle_for_edge = Sessions::new(slot, live, sessions.call_timeout);
        Ok(Node {
            supervisor,
            handle,
            sessions: handle_for_edge,
        })
    }

    /// Stops every actor (children first) and waits for the tree to end.
    pub async fn shutdown(self) {
        self.supervisor.stop(Some("node shutdown".into()));
        let _ = self.handle.await;
    }
}

pub(crate) type SupervisorSlot = Arc<RwLock<Option<ActorRef<SessionSupervisorMessage>>>>;

pub struct NodeSupervisor;

pub struct NodeArgs {
    store: Arc<dyn Store>,
    catalogue: Arc<Catalogue>,
    sessions: SessionConfig,
    slot: SupervisorSlot,
    live: LiveSessions,
    /// One `ProviderPool` per provider, with the state it ticks.
    pool_actors: Vec<(ActorId, Arc<PoolState>)>,
}

#[derive(RactorMessage)]
pub enum NodeMessage {}

impl Actor for NodeSupervisor {
    type Msg = NodeMessage;
    type State = NodeArgs;
    type Arguments = NodeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        mut args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        spawn_session_supervisor(&myself, &args).await?;
        let pools = args.catalogue.pools().pools().to_vec();
        for pool in pools {
            spawn_provider_pool(&myself, &mut args, pool).await?;
        }
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {}
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(actor, err) = event {
            // A pool's live state outlives its actor (it is shared with the calls), so a
            // restarted pool actor simply carries on ticking it.
            let pool = state
                .pool_actors
                .iter()
                .find(|(id, _)| *id == actor.get_id())
                .map(|(_, pool)| pool.clone());
            if let Some(pool) = pool {
                tracing::error!(error = %err, provider = %pool.provider_id, "provider pool failed; restarting it");
                state.pool_actors.retain(|(id, _)| *id != actor.get_id());
                spawn_provider_pool(&myself, state, pool).await?;
            } else {
                // Sessions rebuild from the store, so a fresh supervisor with an empty map is
                // correct.
                tracing::error!(error = %err, "session supervisor failed; restarting it");
                spawn_session_supervisor(&myself, state).await?;
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        myself.stop_children_and_wait(None, None).await;
        Ok(())
    }
}

async fn spawn_provider_pool(
    myself: &ActorRef<NodeMessage>,
    state: &mut NodeArgs,
    pool: Arc<PoolState>,
) -> Result<(), ActorProcessingErr> {
    let args = ProviderPoolArgs {
        pool: pool.clone(),
        breaker: state.catalogue.pools().policy.breaker.clone(),
    };
    let (actor, _) = Actor::spawn_linked(None, ProviderPool, args, myself.get_cell()).await?;
    state.pool_actors.push((actor.get_id(), pool));
    Ok(())
}

async fn spawn_session_supervisor(
    myself: &ActorRef<NodeMessage>,
    state: &NodeArgs,
) -> Result<(), ActorProcessingErr> {
    if let Ok(mut live) = state.live.write() {
        live.clear();
    }
    let args = SessionSupervisorArgs {
        store: state.store.clone(),
        catalogue: state.catalogue.clone(),
        config: state.sessions.clone(),
        live: state.live.clone(),
    };
    let (supervisor, _) =
        Actor::spawn_linked(None, SessionSupervisor, args, myself.get_cell()).await?;
    let mut slot = state
        .slot
        .write()
        .map_err(|_| ActorProcessingErr::from("session supervisor slot poisoned"))?;
    *slot = Some(supervisor);
    Ok(())
}
