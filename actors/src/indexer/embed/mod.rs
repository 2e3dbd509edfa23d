//! Embeddings: texts in, unit vectors out, for the vector half of retrieval.
//!
//! An [`Embedder`] is built once per node from `[embeddings]` (see [`EmbeddingsConfig`]):
//!
//! - `local` ([`local::LocalEmbedder`]): all-MiniLM-L6-v2 (384 dimensions) run in process on the
//!   CPU with candle, from files installed by `scripts/fetch-minilm`. No network, no key.
//! - `provider` ([`provider::ProviderEmbedder`]): a catalogue model with the `embeddings`
//!   capability, called through its provider's embeddings API.
//! - `none`: no embedder; retrieval is lexical only (BM25, [`super::search`]).
//!
//! Every embedder returns vectors of L2 norm 1 (or all zeros for a text with no content), so
//! cosine similarity is a dot product. [`Embedder::id`] names the model: vectors made by
//! different ids are not comparable, so stored embeddings carry it and are recomputed when it
//! changes.

pub mod local;
pub mod provider;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use crate::provider::ProviderError;
use crate::provider::catalogue::Catalogue;

/// Why texts could not be embedded.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The local model's files are missing, unreadable or not a BERT model.
    #[error("embedding model in {dir}: {message} (install it with scripts/fetch-minilm)")]
    ModelFiles { dir: PathBuf, message: String },
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
    #[error("embedding inference failed: {0}")]
    Inference(String),
    /// The blocking inference task panicked or was cancelled.
    #[error("embedding task did not finish: {0}")]
    Task(String),
    #[error("embedding provider failed: {0}")]
    Provider(#[from] ProviderError),
    /// The provider answered with the wrong number of vectors, or vectors of another size than
    /// before.
    #[error("embedding provider answered badly: {0}")]
    BadAnswer(String),
    /// `[embeddings] provider_model` names no enabled model with the `embeddings` capability.
    #[error("embedding model `{model}`: {message}")]
    Model { model: String, message: String },
}

/// Turns texts into vectors. Implementations batch internally (`batch_size` texts per model
/// call) and return one vector per input, in input order.
#[async_trait]
pub trait Embedder: Send + Sync {
    /// The model's identity, e.g. `local:all-MiniLM-L6-v2` or `provider:text-embedding-3-small`.
    fn id(&self) -> &str;

    /// Length of every vector; 0 while not yet known (a provider model's size is learnt from
    /// its first answer).
    fn dimensions(&self) -> usize;

    /// Unit vectors for `texts`, in order. An empty slice gives an empty result without a call.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError>;
}

/// The node's embedder as the indexer's [`ChunkEmbedder`](crate::indexer::ChunkEmbedder): the
/// vectors stored with chunks come from the same model that embeds search queries.
pub struct ForChunks(pub Arc<dyn Embedder>);

#[async_trait]
impl crate::indexer::ChunkEmbedder for ForChunks {
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        self.0.embed(texts).await.map_err(|e| e.to_string())
    }
}

/// Which embedder a node runs (`[embeddings]`, validated).
#[derive(Debug, Clone, PartialEq)]
pub enum EmbedderKind {
    /// No embeddings: retrieval is lexical only.
    None,
    /// all-MiniLM-L6-v2 in process, from this directory.
    Local { model_dir: PathBuf },
    /// A catalogue model with the `embeddings` capability, by id.
    Provider { model: String },
}

/// `[embeddings]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingsConfig {
    pub kind: EmbedderKind,
    /// Texts per model call (a local forward pass, or one provider request).
    pub batch_size: usize,
}

impl Default for EmbeddingsConfig {
    fn default() -> Self {
        EmbeddingsConfig {
            kind: EmbedderKind::None,
            batch_size: 32,
        }
    }
}

/// Builds the configured embedder; `None` for `kind = "none"`. Loading the local model reads
/// ~90 MB and runs on a blocking thread.
pub async fn build(
    config: &EmbeddingsConfig,
    catalogue: &Catalogue,
) -> Result<Option<Arc<dyn Embedder>>, EmbedError> {
    let batch_size = config.batch_size.max(1);
    match &config.kind {
        EmbedderKind::None => Ok(None),
        EmbedderKind::Local { model_dir } => {
            let embedder = local::LocalEmbedder::open(model_dir.clone(), batch_size).await?;
            Ok(Some(Arc::new(embedder)))
        }
        EmbedderKind::Provider { model } => {
            let embedder =
                provider::ProviderEmbedder::from_catalogue(catalogue, model, batch_size)?;
            Ok(Some(Arc::new(embedder)))
        }
    }
}

/// [`build`], but a failure (typically: the local model's files are not installed) is logged
/// as an error and the node runs without embeddings — retrieval lexical only — instead of not
/// starting.
pub async fn build_or_lexical(
    config: &EmbeddingsConfig,
    catalogue: &Catalogue,
) -> Option<Arc<dyn Embedder>> {
    match build(config, catalogue).await {
        Ok(embedder) => embedder,
        Err(err) => {
            tracing::error!(error = %err, "embeddings are off: retrieval is lexical only");
            None
        }
    }
}

/// Scales `vector` to unit L2 norm in place; a zero vector stays zero.
pub fn normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 && norm.is_finite() {
        for x in vector.iter_mut() {
            *x /= norm;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_gives_unit_vectors_and_keeps_zero() {
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut zero = vec![0.0; 3];
        normalize(&mut zero);
        assert_eq!(zero, vec![0.0; 3]);
    }
}
