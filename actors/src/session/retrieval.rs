//! The user's retrieval index, held by their home session (ARCHITECTURE.md: the per-user index
//! lives on the home node and is rebuilt from the store when missing).
//!
//! It is built on the first search and brought up to date before each one from the user's
//! document list: documents that became `ready` since are added (their chunks read once), ones
//! deleted or re-ingested are dropped. No notification from the indexers is needed, and a
//! session that passivated simply rebuilds. Chunk texts are kept next to the index so results
//! carry their text and position without another read.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::SessionError;
use crate::indexer::search::{ChunkId, IndexedChunk, UserIndex};
use crate::store::{ChunkPosition, DocumentStatus, Store};

/// Documents read per page while refreshing.
const DOCUMENT_PAGE: usize = 100;

/// One retrieved chunk, for the search API and for a turn's context.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Passage {
    pub document_id: Uuid,
    pub document_name: String,
    pub chunk: u32,
    pub text: String,
    pub position: ChunkPosition,
    pub score: f32,
    pub bm25_rank: Option<u32>,
    pub vector_rank: Option<u32>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SearchResults {
    /// `hybrid` (BM25 and vectors, fused), or `lexical` (no embedder, or no vectors stored).
    pub mode: std::borrow::Cow<'static, str>,
    pub results: Vec<Passage>,
}

pub struct Retrieval {
    index: UserIndex,
    /// Indexed documents: name and the `updated_at` they were indexed at.
    documents: HashMap<Uuid, (String, DateTime<Utc>)>,
    chunks: HashMap<ChunkId, (String, ChunkPosition)>,
}

impl Default for Retrieval {
    fn default() -> Self {
        Retrieval {
            index: UserIndex::new(),
            documents: HashMap::new(),
            chunks: HashMap::new(),
        }
    }
}

impl Retrieval {
    /// Brings the index in line with the user's `ready` documents; returns their ids.
    pub async fn refresh(
        &mut self,
        store: &dyn Store,
        user_id: Uuid,
    ) -> Result<Vec<Uuid>, SessionError> {
        let mut ready: HashMap<Uuid, (String, DateTime<Utc>)> = HashMap::new();
        let mut cursor = None;
        loop {
            let page = store.list_documents(user_id, DOCUMENT_PAGE, cursor).await?;
            for document in page.items {
                if document.status == DocumentStatus::Ready {
                    ready.insert(document.id, (document.name, document.updated_at));
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let stale: Vec<Uuid> = self
            .documents
            .iter()
            .filter(|(id, (_, at))| ready.get(id).is_none_or(|(_, now)| now != at))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.index.remove_document(id);
            self.chunks.retain(|chunk, _| chunk.document_id != id);
            self.documents.remove(&id);
        }
        for (id, (name, at)) in &ready {
            if self.documents.contains_key(id) {
                continue;
            }
            for chunk in store.list_chunks(user_id, *id).await? {
                let chunk_id = ChunkId {
                    document_id: *id,
                    seq: u32::try_from(chunk.seq).unwrap_or(u32::MAX),
                };
                let indexed = IndexedChunk {
                    chunk_id,
                    text: chunk.text.clone(),
                    embedding: chunk.embedding,
                };
                if let Err(e) = self.index.add(indexed) {
                    // A vector from another embedder (the configuration changed): lexical.
                    tracing::warn!(error = %e, document_id = %id, "chunk indexed without its vector");
                    let lexical = IndexedChunk {
                        chunk_id,
                        text: chunk.text.clone(),
                        embedding: None,
                    };
                    let _ = self.index.add(lexical);
                }
                self.chunks.insert(chunk_id, (chunk.text, chunk.position));
            }
            self.documents.insert(*id, (name.clone(), *at));
        }
        Ok(ready.into_keys().collect())
    }

    /// Whether any indexed chunk has a vector (searches can be hybrid).
    pub fn has_vectors(&self) -> bool {
        self.index.dimensions().is_some_and(|d| d > 0)
    }

    pub fn search(
        &self,
        query: &str,
        embedding: Option<&[f32]>,
        filter: Option<&[Uuid]>,
        top_k: usize,
    ) -> SearchResults {
        let hybrid = embedding.is_some() && self.has_vectors();
        let hits = self
            .index
            .search(query, embedding.filter(|_| hybrid), filter, top_k);
        let results = hits
            .into_iter()
            .filter_map(|hit| {
                let (text, position) = self.chunks.get(&hit.chunk_id)?;
                let (name, _) = self.documents.get(&hit.document_id)?;
                Some(Passage {
                    document_id: hit.document_id,
                    document_name: name.clone(),
                    chunk: hit.chunk_id.seq,
                    text: text.clone(),
                    position: position.clone(),
                    score: hit.score,
                    bm25_rank: hit.bm25_rank,
                    vector_rank: hit.vector_rank,
                })
            })
            .collect();
        SearchResults {
            mode: if hybrid { "hybrid" } else { "lexical" }.into(),
            results,
        }
    }

    /// Every chunk of a document, in order (sending a whole document that fits the context).
    pub fn document_passages(&self, document_id: Uuid) -> Vec<Passage> {
        let Some((name, _)) = self.documents.get(&document_id) else {
            return Vec::new();
        };
        let mut passages: Vec<Passage> = self
            .chunks
            .iter()
            .filter(|(id, _)| id.document_id == document_id)
            .map(|(id, (text, position))| Passage {
                document_id,
                document_name: name.clone(),
                chunk: id.seq,
                text: text.clone(),
                position: position.clone(),
                score: 0.0,
                bm25_rank: None,
                vector_rank: None,
            })
            .collect();
        passages.sort_by_key(|p| p.chunk);
        passages
    }
}
