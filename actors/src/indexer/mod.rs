//! Documents and retrieval: ingestion of uploaded files into chunks.
//!
//! ```text
//! IndexerSupervisor ── DocumentIndexer(document)     one per document being ingested
//! ```
//!
//! An upload is typed while it streams in ([`detect`]), stored as a blob and a `pending` row, and
//! queued here; a `DocumentIndexer` then extracts its text ([`extract`]), cuts it into chunks
//! ([`chunk`]), embeds them when an embedder is configured ([`embed`]), and stores them
//! ([`document`]). The user's home session searches them through a [`search::UserIndex`].

pub mod chunk;
pub mod detect;
pub mod document;
pub mod embed;
pub mod extract;
pub mod search;
pub mod stream;
pub mod supervisor;

pub use document::ChunkEmbedder;
pub use supervisor::{Documents, Indexer, IndexerConfig, IndexerSupervisor, ResumeFilter};
