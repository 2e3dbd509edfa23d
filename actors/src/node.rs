//! `NodeSupervisor`: the root of this node's actor tree.
//!
//! It owns the `SessionSupervisor`, the `ProviderPool`s and (when documents are configured) the
//! `IndexerSupervisor`, and restarts each if it fails; the [`Sessions`] and [`Indexer`] handles
//! given to the edge follow restarts through shared slots. The cluster supervisor comes later.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::RactorMessage;

use crate::blob::BlobStore;
use crate::indexer::supervisor::{IndexerSlot, IndexerSupervisorArgs};
use crate::indexer::{Documents, Indexer, IndexerConfig, IndexerSupervisor};
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
    /// Blob store and ingestion, when documents are configured.
    pub documents: Option<Documents>,
}

/// What a node needs to accept documents.
#[derive(Debug, Clone)]
pub struct DocumentsConfig {
    pub blobs: BlobStore,
    pub indexer: IndexerConfig,
}

impl Node {
    /// A node without documents.
    pub async fn start(
        store: Arc<dyn Store>,
        catalogue: Arc<Catalogue>,
        sessions: SessionConfig,
    ) -> Result<Node, NodeError> {
        Node::start_with(store, catalogue, sessions, None).await
    }

    /// A node; with `documents`, it also runs the `IndexerSupervisor` (resuming unfinished
    /// documents) and its sessions accept document uploads and deletes.
    pub async fn start_with(
        store: Arc<dyn Store>,
        catalogue: Arc<Catalogue>,
        mut sessions: SessionConfig,
        documents: Option<DocumentsConfig>,
    ) -> Result<Node, NodeError> {
        let slot: SupervisorSlot = Arc::new(RwLock::new(None));
        let live: LiveSessions = Arc::new(RwLock::new(HashMap::new()));
        let indexer_slot: IndexerSlot = Arc::new(RwLock::new(None));
        let handles = documents.as_ref().map(|d| Documents {
            blobs: d.blobs.clone(),
            indexer: Indexer::new(indexer_slot.clone()),
        });
        sessions.documents = handles.clone();
        let args = NodeArgs {
            store,
            catalogue: catalogue.clone(),
            sessions: sessions.clone(),
            slot: slot.clone(),
            live: live.clone(),
            pool_actors: Vec::new(),
            indexer: documents.map(|d| IndexerSetup {
                blobs: d.blobs,
                config: Arc::new(d.indexer),
                slot: indexer_slot,
                actor: None,
            }),
        };
        let (supervisor, handle) = Actor::spawn(None, NodeSupervisor, args)
            .await
            .map_err(|e| NodeError::Spawn(e.to_string()))?;
        let handle_for_edge = Sessions::new(slot, live, catalogue, &sessions);
        Ok(Node {
            supervisor,
            handle,
            sessions: handle_for_edge,
            documents: handles,
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
    indexer: Option<IndexerSetup>,
}

struct IndexerSetup {
    blobs: BlobStore,
    config: Arc<IndexerConfig>,
    slot: IndexerSlot,
    /// The running `IndexerSupervisor`.
    actor: Option<ActorId>,
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
        spawn_indexer_supervisor(&myself, &mut args).await?;
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
            let indexer_failed = state
                .indexer
                .as_ref()
                .is_some_and(|i| i.actor == Some(actor.get_id()));
            if indexer_failed {
                // Its queue is rebuilt from the store: unfinished documents are resumed.
                tracing::error!(error = %err, "indexer supervisor failed; restarting it");
                spawn_indexer_supervisor(&myself, state).await?;
            } else if let Some(pool) = pool {
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

async fn spawn_indexer_supervisor(
    myself: &ActorRef<NodeMessage>,
    state: &mut NodeArgs,
) -> Result<(), ActorProcessingErr> {
    let Some(setup) = state.indexer.as_mut() else {
        return Ok(());
    };
    let args = IndexerSupervisorArgs {
        store: state.store.clone(),
        blobs: setup.blobs.clone(),
        config: setup.config.clone(),
    };
    let (supervisor, _) =
        Actor::spawn_linked(None, IndexerSupervisor, args, myself.get_cell()).await?;
    setup.actor = Some(supervisor.get_id());
    let mut slot = setup
        .slot
        .write()
        .map_err(|_| ActorProcessingErr::from("indexer supervisor slot poisoned"))?;
    *slot = Some(supervisor);
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
