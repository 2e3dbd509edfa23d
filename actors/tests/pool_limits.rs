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

/// One mock model whose one deployment (`deployment_id`) takes `rpm` requests per minute.
fn catalogue_with(deployment_id: &str, rpm: u64, buckets: Arc<dyn TokenBuckets>) -> Catalogue {
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
                id: Some(deployment_id.to_owned()),
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

/// A deployment id no other test (or earlier run against the same Redis) uses.
fn fresh_id() -> String {
    format!("limited-{}", uuid::Uuid::new_v4().simple())
}

/// How many of `n` concurrent selections across `catalogues` get a deployment.
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

#[tokio::test]
async fn a_deployment_admits_exactly_its_rpm_in_process() {
    let buckets: Arc<dyn TokenBuckets> = Arc::new(LocalBuckets::new());
    let catalogue = catalogue_with(&fresh_id(), 10, buckets);
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
    // Two nodes reading one models.toml: the same deployment id, each with its own connection.
    let id = fresh_id();
    let nodes = vec![
        catalogue_with(&id, 10, connect().await),
        catalogue_with(&id, 10, connect().await),
    ];
    assert_eq!(
        admitted(&nodes, 100).await,
        10,
        "one limit across both nodes"
    );

    // Each node on its own buckets would have admitted 10 each: the sharing is what holds it.
    let apart = vec![
        catalogue_with(&id, 10, Arc::new(LocalBuckets::new())),
        catalogue_with(&id, 10, Arc::new(LocalBuckets::new())),
    ];
    assert_eq!(admitted(&apart, 100).await, 20);
}
