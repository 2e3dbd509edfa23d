//! Embeddings from a catalogue model's provider (`Provider::embed`: OpenAI-compatible
//! `/v1/embeddings`, Gemini `batchEmbedContents`, the mock), `batch_size` texts per request.
//!
//! Calls go to the model's first enabled deployment, the catalogue's route for calls that need
//! no failover. A retryable failure (429, 5xx, timeout) is tried again after the provider's
//! `Retry-After` or a short backoff, a few times, before the error is returned.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;

use super::{EmbedError, Embedder, normalize};
use crate::provider::Provider;
use crate::provider::catalogue::Catalogue;

/// Tries of one batch, the first included.
const ATTEMPTS: u32 = 3;
/// Backoff before the second try (doubled before the third) when the provider gives none.
const BACKOFF: Duration = Duration::from_millis(500);
/// A provider's `Retry-After` is honoured up to this.
const MAX_WAIT: Duration = Duration::from_secs(10);

pub struct ProviderEmbedder {
    id: String,
    provider: Arc<dyn Provider>,
    upstream: String,
    batch_size: usize,
    /// Learnt from the first answer; every later vector must have this length.
    dimensions: OnceLock<usize>,
}

impl ProviderEmbedder {
    /// `provider` serves the model under the name `upstream`; `model_id` names it in [`Embedder::id`].
    pub fn new(
        model_id: &str,
        provider: Arc<dyn Provider>,
        upstream: &str,
        batch_size: usize,
    ) -> ProviderEmbedder {
        ProviderEmbedder {
            id: format!("provider:{model_id}"),
            provider,
            upstream: upstream.to_owned(),
            batch_size: batch_size.max(1),
            dimensions: OnceLock::new(),
        }
    }

    /// The catalogue model `model_id`, which must be enabled and have the `embeddings` capability.
    pub fn from_catalogue(
        catalogue: &Catalogue,
        model_id: &str,
        batch_size: usize,
    ) -> Result<ProviderEmbedder, EmbedError> {
        let model = catalogue.get(model_id).ok_or_else(|| EmbedError::Model {
            model: model_id.to_owned(),
            message: "no such enabled model in the catalogue (is its provider's key set?)".into(),
        })?;
        if !model.can("embeddings") {
            return Err(EmbedError::Model {
                model: model_id.to_owned(),
                message: "the model has no `embeddings` capability".into(),
            });
        }
        Ok(ProviderEmbedder::new(
            model_id,
            model.provider.clone(),
            &model.spec.upstream,
            batch_size,
        ))
    }

    async fn embed_batch(&self, batch: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut attempt = 1;
        loop {
            match self.provider.embed(&self.upstream, batch).await {
                Ok(vectors) => return Ok(vectors),
                Err(err) if err.retryable() && attempt < ATTEMPTS => {
                    let wait = err
                        .retry_after()
                        .unwrap_or(BACKOFF * 2u32.pow(attempt - 1))
                        .min(MAX_WAIT);
                    tracing::warn!(model = %self.id, attempt, error = %err, ?wait, "embedding batch failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Checks the answer's shape and normalises each vector.
    fn check(&self, sent: usize, vectors: &mut [Vec<f32>]) -> Result<(), EmbedError> {
        if vectors.len() != sent {
            return Err(EmbedError::BadAnswer(format!(
                "{} vectors for {sent} inputs",
                vectors.len()
            )));
        }
        for vector in vectors.iter_mut() {
            let expected = *self.dimensions.get_or_init(|| vector.len());
            if vector.len() != expected || expected == 0 {
                return Err(EmbedError::BadAnswer(format!(
                    "a vector of {} dimensions, expected {expected}",
                    vector.len()
                )));
            }
            if vector.iter().any(|x| !x.is_finite()) {
                return Err(EmbedError::BadAnswer(
                    "a vector with NaN or infinity".into(),
                ));
            }
            normalize(vector);
        }
        Ok(())
    }
}

#[async_trait]
impl Embedder for ProviderEmbedder {
    fn id(&self) -> &str {
        &self.id
    }

    fn dimensions(&self) -> usize {
        self.dimensions.get().copied().unwrap_or(0)
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(self.batch_size) {
            let mut vectors = self.embed_batch(batch).await?;
            self.check(batch.len(), &mut vectors)?;
            out.extend(vectors);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::provider::mock::MockProvider;
    use crate::provider::{ChatRequest, ChunkStream, Completion, ProviderError};

    /// Records batch sizes; answers with scripted errors first, then `[len, 1.0]` per input.
    #[derive(Default)]
    struct Scripted {
        batches: Mutex<Vec<usize>>,
        errors: Mutex<Vec<ProviderError>>,
        dims: usize,
    }

    #[async_trait]
    impl Provider for Scripted {
        fn kind(&self) -> &'static str {
            "scripted"
        }
        async fn stream(&self, _: ChatRequest) -> Result<ChunkStream, ProviderError> {
            Err(ProviderError::Unsupported {
                message: "test".into(),
            })
        }
        async fn complete(&self, _: ChatRequest) -> Result<Completion, ProviderError> {
            Err(ProviderError::Unsupported {
                message: "test".into(),
            })
        }
        async fn embed(
            &self,
            model: &str,
            inputs: &[String],
        ) -> Result<Vec<Vec<f32>>, ProviderError> {
            assert_eq!(model, "upstream-name");
            self.batches.lock().unwrap().push(inputs.len());
            if let Some(err) = self.errors.lock().unwrap().pop() {
                return Err(err);
            }
            Ok(inputs
                .iter()
                .map(|t| {
                    let mut v = vec![0.0; self.dims.max(2)];
                    v[0] = t.len() as f32;
                    v[1] = 1.0;
                    v
                })
                .collect())
        }
    }

    fn texts(n: usize) -> Vec<String> {
        (0..n).map(|i| "x".repeat(i + 1)).collect()
    }

    #[tokio::test]
    async fn batches_keep_order_and_vectors_are_normalised() {
        let provider = Arc::new(Scripted {
            dims: 4,
            ..Default::default()
        });
        let embedder = ProviderEmbedder::new("m", provider.clone(), "upstream-name", 3);
        assert_eq!(embedder.id(), "provider:m");
        assert_eq!(embedder.dimensions(), 0);
        let vectors = embedder.embed(&texts(7)).await.unwrap();
        assert_eq!(*provider.batches.lock().unwrap(), vec![3, 3, 1]);
        assert_eq!(embedder.dimensions(), 4);
        assert_eq!(vectors.len(), 7);
        for (i, v) in vectors.iter().enumerate() {
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-6);
            // In order: the first component grows with the input's length.
            let expected = (i + 1) as f32 / (((i + 1) * (i + 1)) as f32 + 1.0).sqrt();
            assert!((v[0] - expected).abs() < 1e-6, "{i}: {v:?}");
        }
        assert!(embedder.embed(&[]).await.unwrap().is_empty());
        assert_eq!(
            provider.batches.lock().unwrap().len(),
            3,
            "no call for no texts"
        );
    }

    #[tokio::test]
    async fn retryable_errors_are_retried_and_others_are_not() {
        let provider = Arc::new(Scripted {
            dims: 2,
            errors: Mutex::new(vec![ProviderError::RateLimited {
                retry_after: Some(Duration::from_millis(20)),
                message: "slow down".into(),
            }]),
            ..Default::default()
        });
        let embedder = ProviderEmbedder::new("m", provider.clone(), "upstream-name", 8);
        let started = std::time::Instant::now();
        assert_eq!(embedder.embed(&texts(2)).await.unwrap().len(), 2);
        assert!(
            started.elapsed() >= Duration::from_millis(20),
            "waited for Retry-After"
        );
        assert_eq!(*provider.batches.lock().unwrap(), vec![2, 2]);

        let failing = Arc::new(Scripted {
            dims: 2,
            errors: Mutex::new(vec![ProviderError::Auth {
                message: "bad key".into(),
            }]),
            ..Default::default()
        });
        let embedder = ProviderEmbedder::new("m", failing.clone(), "upstream-name", 8);
        let err = embedder.embed(&texts(1)).await.unwrap_err();
        assert!(matches!(
            err,
            EmbedError::Provider(ProviderError::Auth { .. })
        ));
        assert_eq!(failing.batches.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn answers_of_the_wrong_shape_are_errors() {
        struct Short;
        #[async_trait]
        impl Provider for Short {
            fn kind(&self) -> &'static str {
                "short"
            }
            async fn stream(&self, _: ChatRequest) -> Result<ChunkStream, ProviderError> {
                Err(ProviderError::Unsupported {
                    message: "t".into(),
                })
            }
            async fn complete(&self, _: ChatRequest) -> Result<Completion, ProviderError> {
                Err(ProviderError::Unsupported {
                    message: "t".into(),
                })
            }
            async fn embed(
                &self,
                _: &str,
                inputs: &[String],
            ) -> Result<Vec<Vec<f32>>, ProviderError> {
                // One vector too few, and sizes that change with the input.
                Ok(inputs.iter().skip(1).map(|t| vec![1.0; t.len()]).collect())
            }
        }
        let embedder = ProviderEmbedder::new("m", Arc::new(Short), "u", 8);
        let err = embedder.embed(&texts(2)).await.unwrap_err();
        assert!(err.to_string().contains("1 vectors for 2 inputs"), "{err}");
        let embedder = ProviderEmbedder::new("m", Arc::new(Short), "u", 2);
        let err = embedder.embed(&texts(4)).await.unwrap_err();
        assert!(err.to_string().contains("1 vectors for 2 inputs"), "{err}");
    }

    #[tokio::test]
    async fn the_mock_provider_gives_unit_vectors() {
        let embedder = ProviderEmbedder::new("mock-echo", Arc::new(MockProvider), "echo", 2);
        let vectors = embedder
            .embed(&["a".into(), "b".into(), "a".into()])
            .await
            .unwrap();
        assert_eq!(vectors.len(), 3);
        assert_eq!(vectors[0], vectors[2]);
        assert_ne!(vectors[0], vectors[1]);
        assert_eq!(embedder.dimensions(), vectors[0].len());
    }
}
