//! `DocumentIndexer`: ingests one document — extract → chunk → embed → store — off the request
//! path, then stops.
//!
//! **Memory stays bounded.** Text, Markdown, CSV and JSON arrays are streamed: the blob is read
//! in ranged pieces of `piece_bytes` (1 MiB), parsed and chunked in windows on a thread
//! ([`super::stream`], [`super::chunk::StreamChunker`]), and each batch of chunks is embedded
//! and stored before more is read, so a document of any size holds a few pieces and windows
//! and one batch at a time (its extracted text is still capped by `max_text_bytes`, a bound on
//! cost, not memory). HTML, PDF, DOCX and images need the whole file: those are read whole up
//! to `max_whole_bytes` (64 MiB), and a larger one fails with that reason before it is read.
//!
//! Progress is written as it goes: `processing` at 0.05; streamed, then up to 0.99 with the
//! share of the file read when each batch is stored; read whole, 0.4 once extracted and
//! chunked, then up to 0.99 as chunk batches are stored; 1.0 is `ready`. The document ends
//! `ready` with its chunk count or `failed` with a reason a user can act on. Every write checks
//! that the document still exists: a delete while this runs stops it without leaving chunks behind (`put_chunks` refuses chunks of
//! a missing document). Ingestion starts over from the blob each time (existing chunks are
//! dropped first), so a document resumed after a crash ends the same as one ingested once.
//!
//! Errors of the machinery (store or blob store unavailable) fail the actor, and the
//! `IndexerSupervisor` marks the document `failed` from the supervision event; so does a panic.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use tokio::sync::watch;
use uuid::Uuid;

use super::chunk::{ChunkDraft, chunk};
use super::detect::DocumentKind;
use super::extract::{extract, is_streamed, run_isolated};
use super::stream::{ParserConfig, spawn_parser};
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
    if !store
        .update_document_progress(user_id, document_id, &processing(0.05))
        .await?
    {
        return Ok(Outcome::Gone);
    }
    store.delete_chunks(user_id, document_id).await?;

    let kind = DocumentKind::from_mime(&document.mime).ok_or_else(|| {
        Failure::Document(format!(
            "documents of type {} cannot be read",
            document.mime
        ))
    })?;
    let mut sink = Sink::new(state);
    let present = if is_streamed(kind) {
        ingest_streamed(state, &document, kind, &mut sink).await?
    } else {
        ingest_whole(state, &document, kind, &mut sink).await?
    };
    if !present || !sink.flush(0.99).await? {
        return Ok(Outcome::Gone);
    }
    let total = sink.stored;
    if total == 0 {
        return Err(Failure::Document("the document contains no text".into()));
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

fn processing(progress: f64) -> DocumentProgress {
    DocumentProgress {
        status: DocumentStatus::Processing,
        progress,
        chunk_count: 0,
        error: None,
        updated_at: Utc::now(),
    }
}

fn blob_failure(e: BlobError) -> Failure {
    match e {
        BlobError::NotFound(_) => {
            Failure::Document("the uploaded file is missing from the blob store".into())
        }
        e => Failure::Internal(e.to_string()),
    }
}

/// Chunks on their way to the store: embedded and stored a batch at a time.
struct Sink<'a> {
    state: &'a DocumentIndexerArgs,
    pending: Vec<ChunkDraft>,
    /// Chunks stored so far (the next one's `seq`).
    stored: usize,
    /// Last progress written, so it only moves forward.
    progress: f64,
}

impl<'a> Sink<'a> {
    fn new(state: &'a DocumentIndexerArgs) -> Sink<'a> {
        Sink {
            state,
            pending: Vec::new(),
            stored: 0,
            progress: 0.05,
        }
    }

    /// Queues a chunk, storing a batch when one is full (with `progress` to show). False: the
    /// document is gone.
    async fn push(&mut self, draft: ChunkDraft, progress: f64) -> Result<bool, Failure> {
        self.pending.push(draft);
        if self.pending.len() >= self.state.config.batch_size.max(1) {
            return self.flush(progress).await;
        }
        Ok(true)
    }

    /// Embeds and stores what is queued, then shows `progress` (at most 0.99: 1.0 is `ready`).
    async fn flush(&mut self, progress: f64) -> Result<bool, Failure> {
        if self.pending.is_empty() {
            return Ok(true);
        }
        let state = self.state;
        let drafts = std::mem::take(&mut self.pending);
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
            .into_iter()
            .zip(embeddings)
            .enumerate()
            .map(|(i, (draft, embedding))| Chunk {
                user_id: state.user_id,
                document_id: state.document_id,
                seq: (self.stored + i) as i64,
                token_count: draft.token_count as i64,
                text: draft.text,
                position: draft.position,
                embedding,
            })
            .collect();
        if !state
            .store
            .put_chunks(state.user_id, state.document_id, &chunks)
            .await?
        {
            return Ok(false);
        }
        self.stored += chunks.len();
        let progress = progress.min(0.99);
        if progress > self.progress {
            self.progress = progress;
            return Ok(state
                .store
                .update_document_progress(state.user_id, state.document_id, &processing(progress))
                .await?);
        }
        Ok(true)
    }
}

/// A streamed format: ranged reads of `piece_bytes` → parser thread (extract, chunk) → windows
/// of chunks → the sink, each stage waiting on the next. False: the document is gone.
async fn ingest_streamed(
    state: &DocumentIndexerArgs,
    document: &Document,
    kind: DocumentKind,
    sink: &mut Sink<'_>,
) -> Result<bool, Failure> {
    let config = &state.config;
    let piece = config.piece_bytes.max(1);
    let size = state
        .blobs
        .size(&document.blob_key)
        .await
        .map_err(blob_failure)?;
    let parser = spawn_parser(ParserConfig {
        kind,
        piece_bytes: piece,
        whole_objects: size <= config.max_whole_bytes,
        chunk: config.chunk,
        // Extracted text is capped as when read whole (JSON flattening can expand a file).
        max_text_bytes: config.extract.max_text_bytes,
    })
    .map_err(|e| Failure::Document(e.to_string()))?;
    let (pieces, mut windows) = (parser.pieces, parser.chunks);
    let read = AtomicU64::new(0);
    let read = &read;
    // The share of the file read so far.
    let share = move || read.load(Ordering::Relaxed) as f64 / size.max(1) as f64;

    let feed = async move {
        let mut at = 0u64;
        while at < size {
            let end = size.min(at + piece as u64);
            let bytes = state
                .blobs
                .get_range(&document.blob_key, at..end)
                .await
                .map_err(blob_failure)?;
            at = end;
            if pieces.send(bytes).await.is_err() {
                // The parser stopped (its reason comes through the text channel).
                break;
            }
            read.store(at, Ordering::Relaxed);
        }
        Ok::<(), Failure>(())
    };
    let consume = async move {
        // The share of the file whose chunks are queued: a window's chunks spread the progress
        // from there to what has been read since.
        let mut queued = 0.0;
        while let Some(drafts) = windows.recv().await {
            let drafts = drafts.map_err(|e| Failure::Document(e.to_string()))?;
            let now = share();
            if !store_window(sink, drafts, queued, now).await? {
                return Ok(false);
            }
            queued = now;
        }
        Ok::<bool, Failure>(true)
    };
    let ((), present) = tokio::try_join!(feed, consume)?;
    Ok(present)
}

/// Queues a window's chunks, their progress spread over `from..to` of the file.
async fn store_window(
    sink: &mut Sink<'_>,
    drafts: Vec<ChunkDraft>,
    from: f64,
    to: f64,
) -> Result<bool, Failure> {
    let n = drafts.len().max(1) as f64;
    for (i, draft) in drafts.into_iter().enumerate() {
        let share = from + (to - from) * ((i + 1) as f64 / n);
        if !sink.push(draft, 0.05 + 0.94 * share).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A format read whole (PDF, DOCX, HTML, images), at most `max_whole_bytes`.
async fn ingest_whole(
    state: &DocumentIndexerArgs,
    document: &Document,
    kind: DocumentKind,
    sink: &mut Sink<'_>,
) -> Result<bool, Failure> {
    let drafts = read_and_chunk(&state.blobs, &state.config, document, kind).await?;
    if !state
        .store
        .update_document_progress(state.user_id, state.document_id, &processing(0.4))
        .await?
    {
        return Ok(false);
    }
    let total = drafts.len().max(1);
    for (i, draft) in drafts.into_iter().enumerate() {
        if !sink
            .push(draft, 0.4 + 0.6 * ((i + 1) as f64 / total as f64))
            .await?
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Too large to read whole: the reason stored on the document.
fn too_large_to_read_whole(kind: DocumentKind, size: u64, limit: u64) -> Failure {
    Failure::Document(format!(
        "{} files are read whole, at most {limit} bytes; this one has {size}",
        super::extract::parser_name(kind)
    ))
}

/// The blob, its text, its chunks.
async fn read_and_chunk(
    blobs: &BlobStore,
    config: &IndexerConfig,
    document: &Document,
    kind: DocumentKind,
) -> Result<Vec<ChunkDraft>, Failure> {
    let limit = config.max_whole_bytes;
    let size = blobs.size(&document.blob_key).await.map_err(blob_failure)?;
    if size > limit {
        return Err(too_large_to_read_whole(kind, size, limit));
    }
    let bytes = blobs.get(&document.blob_key).await.map_err(blob_failure)?;
    if bytes.len() as u64 > limit {
        return Err(too_large_to_read_whole(kind, bytes.len() as u64, limit));
    }
    let extracted = extract(kind, bytes, &config.extract)
        .await
        .map_err(|e| Failure::Document(e.to_string()))?;
    let params = config.chunk;
    let drafts = run_isolated("chunker", config.extract.timeout, move || {
        chunk(&extracted, &params)
    })
    .await
    .map_err(|e| Failure::Document(e.to_string()))?;
    Ok(drafts)
}
