//! all-MiniLM-L6-v2 in process: candle's BERT on the CPU and the HF tokenizer, computing what
//! sentence-transformers computes for this model — inputs truncated to 256 tokens, the last
//! hidden states mean-pooled over the attention mask, then L2-normalised.
//!
//! The model directory holds `config.json`, `tokenizer.json` and `model.safetensors`
//! (`scripts/fetch-minilm` installs them). Loading and inference are CPU-bound and run on
//! tokio's blocking threads; candle spreads each matrix product over the cores.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use tokenizers::{Tokenizer, TruncationParams};

use super::{EmbedError, Embedder};

/// sentence-transformers' `max_seq_length` for all-MiniLM-L6-v2: longer inputs are cut.
pub const MAX_TOKENS: usize = 256;

/// The id of vectors made by this embedder.
pub const ID: &str = "local:all-MiniLM-L6-v2";

/// The loaded model; cheap to clone (shared).
#[derive(Clone)]
pub struct LocalEmbedder {
    model: Arc<LoadedModel>,
    batch_size: usize,
}

struct LoadedModel {
    bert: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dimensions: usize,
}

impl LocalEmbedder {
    /// Loads the model from `dir` on a blocking thread.
    pub async fn open(dir: PathBuf, batch_size: usize) -> Result<LocalEmbedder, EmbedError> {
        tokio::task::spawn_blocking(move || LocalEmbedder::load(&dir, batch_size))
            .await
            .map_err(|e| EmbedError::Task(e.to_string()))?
    }

    /// Loads the model from `dir`, blocking the calling thread (~90 MB read).
    pub fn load(dir: &Path, batch_size: usize) -> Result<LocalEmbedder, EmbedError> {
        let files_error = |message: String| EmbedError::ModelFiles {
            dir: dir.to_path_buf(),
            message,
        };
        let read = |name: &str| {
            std::fs::read(dir.join(name)).map_err(|e| files_error(format!("{name}: {e}")))
        };
        let config: BertConfig = serde_json::from_slice(&read("config.json")?)
            .map_err(|e| files_error(format!("config.json: {e}")))?;
        let mut tokenizer = Tokenizer::from_bytes(read("tokenizer.json")?)
            .map_err(|e| files_error(format!("tokenizer.json: {e}")))?;
        // The file asks for padding to 128 and truncation at 128; sentence-transformers
        // truncates at 256 and pads per batch (done here, after sorting by length).
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| files_error(format!("tokenizer.json: {e}")))?;
        let device = Device::Cpu;
        let weights =
            VarBuilder::from_buffered_safetensors(read("model.safetensors")?, DType::F32, &device)
                .map_err(|e| files_error(format!("model.safetensors: {e}")))?;
        let bert = BertModel::load(weights, &config)
            .map_err(|e| files_error(format!("model.safetensors: {e}")))?;
        Ok(LocalEmbedder {
            model: Arc::new(LoadedModel {
                bert,
                tokenizer,
                device,
                dimensions: config.hidden_size,
            }),
            batch_size: batch_size.max(1),
        })
    }

    /// How many tokens the model sees of each text ([CLS] and [SEP] included; at most
    /// [`MAX_TOKENS`]: a text counted at the maximum was truncated).
    pub fn token_counts(&self, texts: &[String]) -> Result<Vec<usize>, EmbedError> {
        let encodings = self
            .model
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        Ok(encodings.iter().map(|e| e.get_ids().len()).collect())
    }

    /// Embeds `texts` on the calling thread (blocking; CPU-bound).
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .model
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        let ids: Vec<&[u32]> = encodings.iter().map(|e| e.get_ids()).collect();
        // Similar lengths share a batch, so little compute goes to padding.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![Vec::new(); texts.len()];
        for batch in order.chunks(self.batch_size) {
            let batch_ids: Vec<&[u32]> = batch.iter().map(|&i| ids[i]).collect();
            let vectors = self
                .model
                .forward(&batch_ids)
                .map_err(|e| EmbedError::Inference(e.to_string()))?;
            for (&i, vector) in batch.iter().zip(vectors) {
                out[i] = vector;
            }
        }
        Ok(out)
    }
}

impl LoadedModel {
    /// One forward pass over a batch of token id sequences: mean-pooled, normalised vectors.
    fn forward(&self, batch: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let rows = batch.len();
        let width = batch.iter().map(|ids| ids.len()).max().unwrap_or(0).max(1);
        let mut input_ids = vec![0u32; rows * width];
        let mut mask = vec![0u32; rows * width];
        for (row, ids) in batch.iter().enumerate() {
            input_ids[row * width..row * width + ids.len()].copy_from_slice(ids);
            mask[row * width..row * width + ids.len()].fill(1);
        }
        let input_ids = Tensor::from_vec(input_ids, (rows, width), &self.device)?;
        let mask = Tensor::from_vec(mask, (rows, width), &self.device)?;
        let token_type_ids = input_ids.zeros_like()?;
        // (rows, width, hidden)
        let hidden = self
            .bert
            .forward(&input_ids, &token_type_ids, Some(&mask))?;
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        // At least [CLS] and [SEP] are unmasked in every row, so the count is never zero.
        let counts = mask.sum(1)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
        mean.broadcast_div(&norms)?.to_vec2::<f32>()
    }
}

#[async_trait]
impl Embedder for LocalEmbedder {
    fn id(&self) -> &str {
        ID
    }

    fn dimensions(&self) -> usize {
        self.model.dimensions
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let this = self.clone();
        let texts = texts.to_vec();
        tokio::task::spawn_blocking(move || this.embed_blocking(&texts))
            .await
            .map_err(|e| EmbedError::Task(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let err = LocalEmbedder::load(Path::new("/nonexistent/minilm"), 8)
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(text.contains("/nonexistent/minilm"), "{text}");
        assert!(text.contains("config.json"), "{text}");
        assert!(text.contains("scripts/fetch-minilm"), "{text}");
    }

    #[test]
    fn a_corrupt_model_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), b"{\"nope\": 1}").unwrap();
        let err = LocalEmbedder::load(dir.path(), 8).err().unwrap();
        assert!(matches!(err, EmbedError::ModelFiles { .. }), "{err}");
    }
}
