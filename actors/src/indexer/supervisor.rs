//! `IndexerSupervisor`: runs `DocumentIndexer`s, at most `concurrency` at once on this node.
//!
//! ```text
//! IndexerSupervisor ── DocumentIndexer(document)     one per document being ingested
//! ```
//!
//! The supervisor is the node's ingestion semaphore: documents beyond `concurrency` wait in its
//! queue and stay `pending`; each indexer that ends (done, failed, cancelled or crashed) frees a
//! slot for the next. A crashed indexer's document is marked `failed` with the crash as reason.
//! When it starts, the supervisor queues every document left `pending` or `processing` by a
//! previous process, so none stays `processing` forever — of every user, or only of those
//! [`IndexerConfig::resume_users`] accepts (a cluster node: the users homed on it).
//!
//! The edge and the sessions reach it through the [`Indexer`] handle, which follows restarts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::RactorMessage;
use tokio::sync::watch;
use uuid::Uuid;

use super::chunk::ChunkParams;
use super::document::{ChunkEmbedder, DocumentIndexer, DocumentIndexerArgs, mark_failed};
use super::extract::ExtractConfig;
use crate::blob::BlobStore;
use crate::store::Store;

/// Which users' unfinished documents a node resumes when it starts ("is this user homed here").
pub type ResumeFilter = Arc<dyn Fn(Uuid) -> bool + Send + Sync>;

/// Tunables of ingestion (`[documents]` in chorus.toml).
#[derive(Clone)]
pub struct IndexerConfig {
    /// Documents ingested at once on this node.
    pub concurrency: usize,
    pub chunk: ChunkParams,
    pub extract: ExtractConfig,
    /// Chunks embedded and stored per batch (progress moves per batch).
    pub batch_size: usize,
    /// `None`: chunks are stored without embeddings.
    pub embedder: Option<Arc<dyn ChunkEmbedder>>,
    /// Streamed formats (text, Markdown, CSV, JSON arrays) are read from the blob store in
    /// pieces of this size, and chunked in windows of this much text.
    pub piece_bytes: usize,
    /// Largest file of a format read whole (PDF, DOCX, HTML, images, a JSON object); a larger
    /// one fails with that reason.
    pub max_whole_bytes: u64,
    /// Resume at start only these users' unfinished documents; `None`: every user's.
    pub resume_users: Option<ResumeFilter>,
}

impl Default for IndexerConfig {
    fn default() -> Self {
        IndexerConfig {
            concurrency: 2,
            chunk: ChunkParams::default(),
            extract: ExtractConfig::default(),
            batch_size: 64,
            embedder: None,
            piece_bytes: 1024 * 1024,
            max_whole_bytes: 64 * 1024 * 1024,
            resume_users: None,
        }
    }
}

impl std::fmt::Debug for IndexerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexerConfig")
            .field("concurrency", &self.concurrency)
            .field("chunk", &self.chunk)
            .field("extract", &self.extract)
            .field("batch_size", &self.batch_size)
            .field("embedder", &self.embedder.as_ref().map(|_| "<set>"))
            .field("piece_bytes", &self.piece_bytes)
            .field("max_whole_bytes", &self.max_whole_bytes)
            .field(
                "resume_users",
                &self.resume_users.as_ref().map(|_| "<filter>"),
            )
            .finish()
    }
}

/// Everything documents need on a node: where the bytes go and who ingests them.
#[derive(Clone)]
pub struct Documents {
    pub blobs: BlobStore,
    pub indexer: Indexer,
}

impl std::fmt::Debug for Documents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Documents")
            .field("blobs", &self.blobs)
            .finish_non_exhaustive()
    }
}

pub(crate) type IndexerSlot = Arc<RwLock<Option<ActorRef<IndexerSupervisorMessage>>>>;

/// Handle on this node's `IndexerSupervisor`. Cheap to clone.
#[derive(Clone, Default)]
pub struct Indexer {
    slot: IndexerSlot,
}

impl Indexer {
    pub(crate) fn new(slot: IndexerSlot) -> Indexer {
        Indexer { slot }
    }

    fn supervisor(&self) -> Option<ActorRef<IndexerSupervisorMessage>> {
        self.slot.read().ok().and_then(|s| s.clone())
    }

    /// Queues a stored `pending` document for ingestion. When the supervisor cannot be reached
    /// the document stays `pending` and is picked up at the next start.
    pub fn enqueue(&self, user_id: Uuid, document_id: Uuid) {
        let sent = self
            .supervisor()
            .map(|s| s.send_message(IndexerSupervisorMessage::Enqueue(user_id, document_id)));
        if !matches!(sent, Some(Ok(()))) {
            tracing::warn!(%user_id, %document_id, "indexer unavailable; the document stays pending");
        }
    }

    /// Queues again what is left unfinished (of the users `resume_users` accepts now). A
    /// cluster node calls it once it has joined: at start it is nobody's home yet.
    pub fn resume(&self) {
        if let Some(s) = self.supervisor() {
            let _ = s.send_message(IndexerSupervisorMessage::Resume);
        }
    }

    /// Stops the document's ingestion if it is queued or running.
    pub fn cancel(&self, user_id: Uuid, document_id: Uuid) {
        if let Some(s) = self.supervisor() {
            let _ = s.send_message(IndexerSupervisorMessage::Cancel(user_id, document_id));
        }
    }
}

pub struct IndexerSupervisor;

pub struct IndexerSupervisorArgs {
    pub store: Arc<dyn Store>,
    pub blobs: BlobStore,
    pub config: Arc<IndexerConfig>,
}

/// A document being ingested.
struct Running {
    user_id: Uuid,
    document_id: Uuid,
    cancel: watch::Sender<bool>,
}

pub struct IndexerSupervisorState {
    store: Arc<dyn Store>,
    blobs: BlobStore,
    config: Arc<IndexerConfig>,
    queue: VecDeque<(Uuid, Uuid)>,
    queued: HashSet<Uuid>,
    running: HashMap<ActorId, Running>,
}

#[derive(RactorMessage)]
pub enum IndexerSupervisorMessage {
    /// `(user_id, document_id)` of a `pending` document.
    Enqueue(Uuid, Uuid),
    Cancel(Uuid, Uuid),
    /// Queue what a previous process left unfinished (sent to itself on start).
    Resume,
}

/// Most documents re-queued at one start (the rest wait for the next).
const RESUME_LIMIT: usize = 10_000;

impl Actor for IndexerSupervisor {
    type Msg = IndexerSupervisorMessage;
    type State = IndexerSupervisorState;
    type Arguments = IndexerSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_message(IndexerSupervisorMessage::Resume)?;
        Ok(IndexerSupervisorState {
            store: args.store,
            blobs: args.blobs,
            config: args.config,
            queue: VecDeque::new(),
            queued: HashSet::new(),
            running: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            IndexerSupervisorMessage::Enqueue(user_id, document_id) => {
                push(state, user_id, document_id);
            }
            IndexerSupervisorMessage::Cancel(user_id, document_id) => {
                if state.queued.remove(&document_id) {
                    state
                        .queue
                        .retain(|(u, d)| !(*u == user_id && *d == document_id));
                }
                for running in state.running.values() {
                    if running.user_id == user_id && running.document_id == document_id {
                        running.cancel.send_replace(true);
                    }
                }
            }
            IndexerSupervisorMessage::Resume => {
                // A failing store must not take the supervisor down with it: the documents stay
                // unfinished and the next start tries again.
                match state.store.list_unfinished_documents(RESUME_LIMIT).await {
                    Ok(mut documents) => {
                        if let Some(homed_here) = &state.config.resume_users {
                            documents.retain(|doc| homed_here(doc.user_id));
                        }
                        if !documents.is_empty() {
                            tracing::info!(
                                count = documents.len(),
                                "resuming documents left unfinished by a previous run"
                            );
                        }
                        for doc in documents {
                            push(state, doc.user_id, doc.id);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "listing unfinished documents failed"),
                }
            }
        }
        pump(&myself, state).await;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure) = match &event {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(err.to_string())),
            _ => return Ok(()),
        };
        if let Some(running) = state.running.remove(&cell.get_id())
            && let Some(error) = failure
        {
            let (user_id, document_id) = (running.user_id, running.document_id);
            tracing::error!(%user_id, %document_id, %error, "document indexer crashed");
            let reason = format!("ingestion failed unexpectedly: {error}");
            if let Err(e) = mark_failed(&*state.store, user_id, document_id, &reason).await {
                tracing::error!(%user_id, %document_id, error = %e, "marking a document failed");
            }
        }
        pump(&myself, state).await;
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Node shutdown: running documents are cut short and stay `processing`; the next start
        // resumes them.
        for running in state.running.values() {
            running.cancel.send_replace(true);
        }
        myself
            .stop_children_and_wait(None, Some(std::time::Duration::from_secs(5)))
            .await;
        Ok(())
    }
}

fn push(state: &mut IndexerSupervisorState, user_id: Uuid, document_id: Uuid) {
    let running = state.running.values().any(|r| r.document_id == document_id);
    if !running && state.queued.insert(document_id) {
        state.queue.push_back((user_id, document_id));
    }
}

/// Starts queued documents while slots are free.
async fn pump(myself: &ActorRef<IndexerSupervisorMessage>, state: &mut IndexerSupervisorState) {
    while state.running.len() < state.config.concurrency.max(1) {
        let Some((user_id, document_id)) = state.queue.pop_front() else {
            return;
        };
        state.queued.remove(&document_id);
        let (cancel, cancelled) = watch::channel(false);
        let args = DocumentIndexerArgs {
            user_id,
            document_id,
            store: state.store.clone(),
            blobs: state.blobs.clone(),
            config: state.config.clone(),
            cancel: cancelled,
        };
        match Actor::spawn_linked(None, DocumentIndexer, args, myself.get_cell()).await {
            Ok((actor, _)) => {
                state.running.insert(
                    actor.get_id(),
                    Running {
                        user_id,
                        document_id,
                        cancel,
                    },
                );
            }
            Err(e) => {
                tracing::error!(%user_id, %document_id, error = %e, "spawning a document indexer");
                let reason = format!("ingestion could not start: {e}");
                if let Err(e) = mark_failed(&*state.store, user_id, document_id, &reason).await {
                    tracing::error!(%user_id, %document_id, error = %e, "marking a document failed");
                }
            }
        }
    }
}
