//! Per-deployment limits held by the provider pools: 100 concurrent calls against a deployment
//! of `rpm = 10` admit exactly 10 — in process, and with two nodes' pools (two catalogues, as two
//! `chorus` processes build them) sharing one real `redis-server`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use chorus_actors::provider::catalogue::{
    Catalogue, CatalogueFile, DeploymentSpec, ModelSpec, ProviderSpec,
};
use chorus_actors::provider::pool::{RoutingPolicy, SelectRequest};
use chorus_actors::quota::{LocalBuckets, RedisBuckets, TokenBuckets};
use common::redis_server::RedisServer;
use futures_util::future::join_all;

/// One mock model with one deployment limited to `rpm` requests per minute.
fn catalogue(rpm: u64, buckets: Arc<dyn TokenBuckets>) -> Catalogue {
    let file = CatalogueFile {
        providers: [(
            "mock".to_owned(),
            ProviderSpec {
                kind: "mock".into(),
                base_url: None,
                api_key_env: None,
                base_url_env: None,
                enabled_by_env: None,
            },
        )]
        .into_iter()
        .collect(),
        models: vec![ModelSpec {
            id: "limited".into(),
            name: "limited".into(),
            provider: "mock".into(),
            upstream: "echo".into(),
            context_length: 8192,
            input_per_mtok: 0.0,
            output_per_mtok: 0.0,
            capabilities: vec!["chat".into()],
            tiers: vec!["free".into()],
            max_output_tokens: 64,
            deployments: vec![DeploymentSpec {
                id: Some(format!("limited-{}", uuid::Uuid::new_v4().simple())),
                provider: "mock".into(),
                upstream: None,
                base_url: None,
                api_key_env: None,
                weight: 1,
                priority: 0,
                rpm: Some(rpm),
                tpm: None,
                first_token_timeout_ms: None,
                timeout_ms: None,
            }],
            fallbacks: Vec::new(),
            context_fallbacks: Vec::new(),
            continue_after_cut: None,
        }],
    };
    Catalogue::build_with(&file, &|_| None, RoutingPolicy::default(), Some(buckets)).unwrap()
}

/// How many of `n` concurrent selections across `catalogues` get a deployment. Each catalogue
/// gets its own copy of the model: the deployment id (the bucket key) is the same one.
async fn admitted(catalogues: &[Catalogue], n: usize) -> usize {
    let calls = (0..n).map(|i| {
        let catalogue = &catalogues[i % catalogues.len()];
        async move {
            let model = catalogue.get("limited").unwrap();
            let lease = catalogue
                .pools()
                .select(&model.deployments, &SelectRequest::default())
                .await;
            lease.is_some()
        }
    });
    join_all(calls).await.into_iter().filter(|ok| *ok).count()
}

/// Two catalogues whose deployment has the same id, as on two nodes reading one models.toml.
fn twins(rpm: u64, a: Arc<dyn TokenBuckets>, b: Arc<dyn TokenBuckets>) -> Vec<Catalogue> {
    let first = catalogue(rpm, a);
    let id = first.get("limited").unwrap().deployments[0]
        .config
        .id
        .clone();
    let second = rebuild_with_id(rpm, &id, catalogue(rpm, b));
    vec![first, second]
}

fn rebuild_with_id(rpm: u64, id: &str, built: Catalogue) -> Catalogue {
    let buckets = built.pools().buckets().cloned().unwrap();
    let mut file_model = built.get("limited").unwrap().spec.clone();
    file_model.deployments[0].id = Some(id.to_owned());
    file_model.deployments[0].rpm = Some(rpm);
    let file = CatalogueFile {
        providers: [(
            "mock".to_owned(),
            ProviderSpec {
                kind: "mock".into(),
                base_url: None,
                api_key_env: None,
                base_url_env: None,
                enabled_by_env: None,
            },
        )]
        .into_iter()
        .collect(),
        models: vec![file_model],
    };
    Catalogue::build_with(&file, &|_| None, RoutingPolicy::default(), Some(buckets)).unwrap()
}

#[tokio::test]
async fn a_deployment_admits_exactly_its_rpm_in_process() {
    let buckets: Arc<dyn TokenBuckets> = Arc::new(LocalBuckets::new());
    let catalogue = catalogue(10, buckets);
    assert_eq!(admitted(std::slice::from_ref(&catalogue), 100).await, 10);
    let snapshot = catalogue.pools().snapshot().await;
    let levels = snapshot[0].deployments[0].bucket_levels.clone().unwrap();
    assert_eq!(levels.requests_remaining, Some(0));
}

#[tokio::test]
async fn two_nodes_pools_sharing_redis_admit_exactly_the_rpm_together() {
    let server = RedisServer::start();
    let connect = || async {
        let buckets: Arc<dyn TokenBuckets> = Arc::new(
            RedisBuckets::connect(
                &server.url(),
                "chorus-pool-test",
                Duration::from_millis(500),
                1.0,
            )
            .await,
        );
        buckets
    };
    let nodes = twins(10, connect().await, connect().await);
    assert_eq!(
        admitted(&nodes, 100).await,
        10,
        "one limit across both nodes"
    );

    // Each node on its own buckets would have admitted 10 each: the sharing is what holds it.
    let apart = vec![
        catalogue(10, Arc::new(LocalBuckets::new())),
        catalogue(10, Arc::new(LocalBuckets::new())),
    ];
    assert_eq!(admitted(&apart, 100).await, 20);
}
