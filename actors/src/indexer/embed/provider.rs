//! Embeddings from a catalogue model's provider (`Provider::embed`: OpenAI-compatible
//! `/v1/embeddings`, Gemini `batchEmbedContents`, the mock), `batch_size` texts per request.
//!
//! Built from the catalogue ([`ProviderEmbedder::from_catalogue`]), every batch goes through
//! the provider pools like a chat call: [`Pools::select`] picks one of the model's deployments
//! whose breaker lets calls through, that is not cooling down after a 429, and that has room in
//! its rpm bucket and, for the batch's estimated tokens, its tpm bucket (in Redis when the
//! cluster shares limits); the outcome is recorded on the lease (breaker, latency, metrics). A
//! retryable failure (429, 5xx, timeout) moves to the next deployment at once; when every one
//! failed, the round starts again after the policy's backoff (at least the `Retry-After`), up
//! to `routing.max_attempts` calls within `routing.deadline`. When none is available now, a
//! short cool-down (≤ 10 s) is waited out, a longer one is a rate-limited error saying when.
//! A request error is returned at once.
//!
//! [`ProviderEmbedder::new`] calls one provider directly instead (a few tries, the same
//! backoff rules), for callers that hold no catalogue.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{EmbedError, Embedder, normalize};
use crate::provider::catalogue::Catalogue;
use crate::provider::pool::{Deployment, Pools, SelectRequest};
use crate::provider::{Provider, ProviderError};

/// Tries of one batch, the first included.
const ATTEMPTS: u32 = 3;
/// Backoff before the second try (doubled before the third) when the provider gives none.
const BACKOFF: Duration = Duration::from_millis(500);
/// A provider's `Retry-After` is honoured up to this.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// Where a batch goes.
enum Route {
    /// One provider, called directly.
    Direct {
        provider: Arc<dyn Provider>,
        upstream: String,
    },
    /// The model's deployments, chosen and limited by the pools.
    Pooled {
        pools: Arc<Pools>,
        deployments: Vec<Arc<Deployment>>,
    },
}

pub struct ProviderEmbedder {
    id: String,
    route: Route,
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
            route: Route::Direct {
                provider,
                upstream: upstream.to_owned(),
            },
            batch_size: batch_size.max(1),
            dimensions: OnceLock::new(),
        }
    }

    /// Batches go to `deployments` (one model's), chosen and limited by `pools`.
    pub fn pooled(
        model_id: &str,
        pools: Arc<Pools>,
        deployments: Vec<Arc<Deployment>>,
        batch_size: usize,
    ) -> ProviderEmbedder {
        ProviderEmbedder {
            id: format!("provider:{model_id}"),
            route: Route::Pooled { pools, deployments },
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
        Ok(ProviderEmbedder::pooled(
            model_id,
            catalogue.pools().clone(),
            model.deployments.clone(),
            batch_size,
        ))
    }

    async fn embed_batch(&self, batch: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        match &self.route {
            Route::Direct { provider, upstream } => {
                self.embed_direct(&**provider, upstream, batch).await
            }
            Route::Pooled { pools, deployments } => {
                Ok(self.embed_pooled(pools, deployments, batch).await?)
            }
        }
    }

    /// One batch through the pools (see the module doc).
    async fn embed_pooled(
        &self,
        pools: &Pools,
        deployments: &[Arc<Deployment>],
        batch: &[String],
    ) -> Result<Vec<Vec<f32>>, ProviderError> {
        let policy = &pools.policy;
        let deadline = Instant::now() + policy.deadline;
        let estimated_tokens = estimate_tokens(batch);
        let mut calls = 0u32;
        let mut cooldowns_waited = 0u32;
        let mut failed_this_round: Vec<String> = Vec::new();
        let mut last_error: Option<ProviderError> = None;
        loop {
            let select = SelectRequest {
                affinity: None,
                exclude: &failed_this_round,
                estimated_tokens,
                own_key_providers: &[],
            };
            let Some(mut lease) = pools.select(deployments, &select).await else {
                if let Some(error) = last_error.take() {
                    // Every available deployment failed this round: again after a backoff
                    // while the error may pass and there is time and tries left.
                    let wait = policy.backoff(calls.saturating_sub(1), error.retry_after());
                    if !error.retryable()
                        || calls >= policy.max_attempts
                        || Instant::now() + wait >= deadline
                    {
                        return Err(error);
                    }
                    tracing::warn!(model = %self.id, calls, %error, ?wait, "embedding batch failed on every deployment; retrying");
                    tokio::time::sleep(wait).await;
                    failed_this_round.clear();
                    continue;
                }
                // Nothing was tried: every deployment is cooling down, out of budget or broken.
                return match pools.next_available_in(deployments, &[]) {
                    Some((wait, _))
                        if wait <= MAX_WAIT
                            && cooldowns_waited < ATTEMPTS
                            && Instant::now() + wait < deadline =>
                    {
                        cooldowns_waited += 1;
                        tokio::time::sleep(wait + Duration::from_millis(5)).await;
                        continue;
                    }
                    Some((wait, rate_limited)) => {
                        let retry_after = Some(wait.max(Duration::from_secs(1)));
                        let message = format!(
                            "every deployment of {} is {} for {:.1}s",
                            self.id,
                            if rate_limited {
                                "rate limited"
                            } else {
                                "failing (breaker open)"
                            },
                            wait.as_secs_f64()
                        );
                        Err(if rate_limited {
                            ProviderError::RateLimited {
                                retry_after,
                                message,
                            }
                        } else {
                            ProviderError::Overloaded {
                                retry_after,
                                message,
                            }
                        })
                    }
                    None => Err(ProviderError::Overloaded {
                        retry_after: None,
                        message: format!("no deployment of {} is available", self.id),
                    }),
                };
            };
            calls += 1;
            let deployment = lease.deployment.clone();
            let started = Instant::now();
            let left = deadline.saturating_duration_since(started);
            let outcome = match tokio::time::timeout(
                left,
                deployment
                    .provider
                    .embed(&deployment.config.upstream, batch),
            )
            .await
            {
                Ok(outcome) => outcome,
                Err(_) => Err(ProviderError::Timeout {
                    message: format!("no embeddings within {left:?}"),
                }),
            };
            match outcome {
                Ok(vectors) => {
                    lease.succeeded(started.elapsed());
                    return Ok(vectors);
                }
                Err(error) => {
                    lease.failed(&error);
                    // Refused: the bucket gets its token reservation back.
                    lease.settle_tokens(0).await;
                    if !error.retryable() {
                        return Err(error);
                    }
                    tracing::warn!(model = %self.id, deployment = %deployment.config.id, %error, "embedding batch failed; trying another deployment");
                    failed_this_round.push(deployment.config.id.clone());
                    last_error = Some(error);
                }
            }
        }
    }

    async fn embed_direct(
        &self,
        provider: &dyn Provider,
        upstream: &str,
        batch: &[String],
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut attempt = 1;
        loop {
            match provider.embed(upstream, batch).await {
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

/// Tokens a batch is reserved from a deployment's tpm bucket: about four bytes a token, plus
/// one per input.
fn estimate_tokens(batch: &[String]) -> u64 {
    batch.iter().map(|t| t.len() as u64 / 4 + 1).sum()
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

    fn pooled_deployment(
        id: &str,
        priority: u32,
        rpm: Option<u64>,
        provider: Arc<Scripted>,
    ) -> Arc<Deployment> {
        Arc::new(Deployment::new(
            crate::provider::pool::DeploymentConfig {
                id: id.into(),
                provider_id: "scripted".into(),
                upstream: "upstream-name".into(),
                weight: 1,
                priority,
                rpm,
                tpm: None,
                first_token_timeout: None,
                timeout: None,
            },
            provider,
        ))
    }

    fn limited_pools() -> Arc<Pools> {
        Arc::new(Pools::new(
            Vec::new(),
            Some(Arc::new(crate::quota::LocalBuckets::new())),
            crate::provider::pool::RoutingPolicy::default(),
        ))
    }

    fn scripted(errors: Vec<ProviderError>) -> Arc<Scripted> {
        Arc::new(Scripted {
            dims: 2,
            errors: Mutex::new(errors),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn pooled_batches_respect_deployment_rpm_and_fail_over() {
        // `main` takes one request a minute; `spare` serves only when `main` cannot.
        let main = scripted(Vec::new());
        let spare = scripted(Vec::new());
        let deployments = vec![
            pooled_deployment("main", 0, Some(1), main.clone()),
            pooled_deployment("spare", 1, None, spare.clone()),
        ];
        let embedder = ProviderEmbedder::pooled("m", limited_pools(), deployments, 1);
        assert_eq!(embedder.embed(&texts(3)).await.unwrap().len(), 3);
        assert_eq!(*main.batches.lock().unwrap(), vec![1]);
        assert_eq!(*spare.batches.lock().unwrap(), vec![1, 1]);

        // A server error on the preferred deployment moves the batch to the next one at once.
        let failing = scripted(vec![ProviderError::Server {
            status: 500,
            message: "boom".into(),
        }]);
        let healthy = scripted(Vec::new());
        let deployments = vec![
            pooled_deployment("failing", 0, None, failing.clone()),
            pooled_deployment("healthy", 1, None, healthy.clone()),
        ];
        let embedder = ProviderEmbedder::pooled("m", limited_pools(), deployments, 8);
        assert_eq!(embedder.embed(&texts(2)).await.unwrap().len(), 2);
        assert_eq!(*failing.batches.lock().unwrap(), vec![2]);
        assert_eq!(*healthy.batches.lock().unwrap(), vec![2]);
    }

    #[tokio::test]
    async fn pooled_batches_are_refused_when_every_deployment_is_out_of_budget() {
        let only = scripted(Vec::new());
        let deployments = vec![pooled_deployment("only", 0, Some(1), only.clone())];
        let embedder = ProviderEmbedder::pooled("m", limited_pools(), deployments, 1);
        // The second batch finds the bucket empty for most of a minute: a rate-limited error
        // saying when, not a call beyond the deployment's limit.
        let err = embedder.embed(&texts(2)).await.unwrap_err();
        match err {
            EmbedError::Provider(ProviderError::RateLimited { retry_after, .. }) => {
                assert!(retry_after.is_some_and(|w| w > MAX_WAIT));
            }
            other => panic!("expected a rate-limited error, got {other}"),
        }
        assert_eq!(*only.batches.lock().unwrap(), vec![1]);

        // A request error is not retried elsewhere.
        let bad = scripted(vec![ProviderError::BadRequest {
            message: "no".into(),
        }]);
        let other = scripted(Vec::new());
        let deployments = vec![
            pooled_deployment("bad", 0, None, bad.clone()),
            pooled_deployment("other", 1, None, other.clone()),
        ];
        let embedder = ProviderEmbedder::pooled("m", limited_pools(), deployments, 8);
        assert!(embedder.embed(&texts(1)).await.is_err());
        assert!(other.batches.lock().unwrap().is_empty());
    }
}
