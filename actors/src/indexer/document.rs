//! `DocumentIndexer`: ingests one document — extract → chunk → embed → store — off the request
//! path, then stops.
//!
//! Progress is written as it goes (`processing` at 0.05, 0.4 once extracted and chunked, then up
//! to 0.99 as chunk batches are stored; 1.0 is `ready`), and the document ends `ready` with its chunk count or
//! `failed` with a reason a user can act on. Every write checks that the document still exists:
//! a delete while this runs stops it without leaving chunks behind (`put_chunks` refuses chunks of
//! a missing document). Ingestion starts over from the blob each time (existing chunks are
//! dropped first), so a document resumed after a crash ends the same as one ingested once.
//!
//! Errors of the machinery (store or blob store unavailable) fail the actor, and the
//! `IndexerSupervisor` marks the document `failed` from the supervision event; so does a panic.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use tokio::sync::watch;
use uuid::Uuid;

use super::chunk::{ChunkDraft, chunk};
use super::detect::DocumentKind;
use super::extract::{extract, run_isolated};
use super::supervisor::IndexerConfig;
use crate::blob::{BlobError, BlobStore};
use crate::store::{Chunk, Document, DocumentProgress, DocumentStatus, Store};

/// Turns chunk texts into embedding vectors while a document is ingested. `None` in the
/// [`IndexerConfig`]: chunks are stored without embeddings (keyword search only).
#[async_trait]
pub trait ChunkEmbedder: Send + Sync + 'static {
    /// One vector per text, in order.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String>;
}

pub struct DocumentIndexer;

pub struct DocumentIndexerArgs {
    pub user_id: Uuid,
    pub document_id: Uuid,
    pub store: Arc<dyn Store>,
    pub blobs: BlobStore,
    pub config: Arc<IndexerConfig>,
    /// Set to `true` to stop (the document was deleted).
    pub cancel: watch::Receiver<bool>,
}

#[derive(RactorMessage)]
pub enum DocumentIndexerMessage {
    Run,
}

impl Actor for DocumentIndexer {
    type Msg = DocumentIndexerMessage;
    type State = DocumentIndexerArgs;
    type Arguments = DocumentIndexerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_message(DocumentIndexerMessage::Run)?;
        Ok(args)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            DocumentIndexerMessage::Run => {
                let started = Instant::now();
                let mut cancel = state.cancel.clone();
                let outcome = tokio::select! {
                    outcome = ingest(state) => outcome,
                    () = cancelled(&mut cancel) => Ok(Outcome::Gone),
                };
                let (user_id, document_id) = (state.user_id, state.document_id);
                match outcome {
                    Ok(Outcome::Ready(chunks)) => tracing::info!(
                        %user_id, %document_id, chunks,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "document ingested"
                    ),
                    Ok(Outcome::Gone) => {
                        tracing::info!(%user_id, %document_id, "document ingestion stopped (deleted, or the node is stopping)");
                    }
                    Ok(Outcome::Skipped) => {}
                    Err(Failure::Document(reason)) => {
                        tracing::info!(%user_id, %document_id, %reason, "document failed");
                        mark_failed(&*state.store, user_id, document_id, &reason).await?;
                    }
                    Err(Failure::Internal(error)) => return Err(error.into()),
                }
                myself.stop(None);
            }
        }
        Ok(())
    }
}

/// Resolves once `cancel` turns true (never, if its sender is gone without doing so).
async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Marks a document failed, dropping chunks a partial run stored; false when it no longer
/// exists.
pub async fn mark_failed(
    store: &dyn Store,
    user_id: Uuid,
    document_id: Uuid,
    reason: &str,
) -> Result<bool, crate::store::StoreError> {
    let progress = match store.get_document(user_id, document_id).await? {
        Some(doc) => doc.progress,
        None => return Ok(false),
    };
    store.delete_chunks(user_id, document_id).await?;
    store
        .update_document_progress(
            user_id,
            document_id,
            &DocumentProgress {
                status: DocumentStatus::Failed,
                progress,
                chunk_count: 0,
                error: Some(reason.to_owned()),
                updated_at: Utc::now(),
            },
        )
        .await
}

enum Outcome {
    Ready(usize),
    /// Deleted meanwhile.
    Gone,
    /// Already ready or failed (a duplicate request).
    Skipped,
}

enum Failure {
    /// The document cannot be ingested; the reason is stored on it.
    Document(String),
    /// The machinery failed: the actor fails and its supervisor records it.
    Internal(String),
}

impl From<crate::store::StoreError> for Failure {
    fn from(e: crate::store::StoreError) -> Self {
        Failure::Internal(format!("store: {e}"))
    }
}

async fn ingest(state: &DocumentIndexerArgs) -> Result<Outcome, Failure> {
    let store = &*state.store;
    let (user_id, document_id) = (state.user_id, state.document_id);
    let Some(document) = store.get_document(user_id, document_id).await? else {
        return Ok(Outcome::Gone);
    };
    if matches!(
        document.status,
        DocumentStatus::Ready | DocumentStatus::Failed
    ) {
        return Ok(Outcome::Skipped);
    }
    let progress = |progress: f64| DocumentProgress {
        status: DocumentStatus::Processing,
        progress,
        chunk_count: 0,
        error: None,
        updated_at: Utc::now(),
    };
    if !store
        .update_document_progress(user_id, document_id, &progress(0.05))
        .await?
    {
        return Ok(Outcome::Gone);
    }
    store.delete_chunks(user_id, document_id).await?;

    let drafts = match read_and_chunk(&state.blobs, &state.config, &document).await {
        Ok(drafts) => drafts,
        Err(failure) => return Err(failure),
    };
    if !store
        .update_document_progress(user_id, document_id, &progress(0.4))
        .await?
    {
        return Ok(Outcome::Gone);
    }

    let total = drafts.len();
    let batch = state.config.batch_size.max(1);
    let mut stored = 0;
    for (batch_no, drafts) in drafts.chunks(batch).enumerate() {
        let embeddings = match &state.config.embedder {
            None => vec![None; drafts.len()],
            Some(embedder) => {
                let texts: Vec<String> = drafts.iter().map(|d| d.text.clone()).collect();
                let vectors = embedder
                    .embed(&texts)
                    .await
                    .map_err(|e| Failure::Document(format!("embedding failed: {e}")))?;
                if vectors.len() != texts.len() {
                    return Err(Failure::Document(format!(
                        "embedding failed: {} vectors for {} chunks",
                        vectors.len(),
                        texts.len()
                    )));
                }
                vectors.into_iter().map(Some).collect()
            }
        };
        let chunks: Vec<Chunk> = drafts
            .iter()
            .zip(embeddings)
            .enumerate()
            .map(|(i, (draft, embedding))| Chunk {
                user_id,
                document_id,
                seq: (batch_no * batch + i) as i64,
                text: draft.text.clone(),
                position: draft.position.clone(),
                token_count: draft.token_count as i64,
                embedding,
            })
            .collect();
        if !store.put_chunks(user_id, document_id, &chunks).await? {
            return Ok(Outcome::Gone);
        }
        stored += chunks.len();
        let done = 0.4 + 0.6 * (stored as f64 / total as f64);
        // 1.0 is for `ready` only.
        if stored < total
            && !store
                .update_document_progress(user_id, document_id, &progress(done.min(0.99)))
                .await?
        {
            return Ok(Outcome::Gone);
        }
    }
    let ready = DocumentProgress {
        status: DocumentStatus::Ready,
        progress: 1.0,
        chunk_count: total as i64,
        error: None,
        updated_at: Utc::now(),
    };
    if !store
        .update_document_progress(user_id, document_id, &ready)
        .await?
    {
        return Ok(Outcome::Gone);
    }
    Ok(Outcome::Ready(total))
}

/// The blob, its text, its chunks.
async fn read_and_chunk(
    blobs: &BlobStore,
    config: &IndexerConfig,
    document: &Document,
) -> Result<Vec<ChunkDraft>, Failure> {
    let kind = DocumentKind::from_mime(&document.mime).ok_or_else(|| {
        Failure::Document(format!(
            "documents of type {} cannot be read",
            document.mime
        ))
    })?;
    let bytes = match blobs.get(&document.blob_key).await {
        Ok(bytes) => bytes,
        Err(BlobError::NotFound(_)) => {
            return Err(Failure::Document(
                "the uploaded file is missing from the blob store".into(),
            ));
        }
        Err(e) => return Err(Failure::Internal(e.to_string())),
    };
    let extracted = extract(kind, bytes, &config.extract)
        .await
        .map_err(|e| Failure::Document(e.to_string()))?;
    let params = config.chunk;
    let drafts = run_isolated("chunker", config.extract.timeout, move || {
        chunk(&extracted, &params)
    })
    .await
    .map_err(|e| Failure::Document(e.to_string()))?;
    if drafts.is_empty() {
        return Err(Failure::Document("the document contains no text".into()));
    }
    Ok(drafts)
}
